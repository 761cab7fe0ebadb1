"""Brokers for the device-agent tests: a real Mosquitto and the embedded amqtt broker, each on
a free loopback port, started per test and stopped afterwards; a TLS Mosquitto with
certificates made by the ``openssl`` CLI; and a check that a test leaves no threads behind."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeswarm.device_agent.broker import EmbeddedBroker, Mosquitto, TlsFiles


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """An anonymous Mosquitto on 127.0.0.1 (MQTT 5 and 3.1.1, TCP_NODELAY on)."""
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The embedded amqtt broker on 127.0.0.1 (MQTT 3.1.1 only)."""
    with EmbeddedBroker() as broker:
        yield broker


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (EC P-256, 1 day)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=edgeswarm test CA", cwd=tmp_path)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=tmp_path)
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext",
             cwd=tmp_path)
    return TlsFiles(cafile=tmp_path / "ca.crt", certfile=tmp_path / "server.crt",
                    keyfile=tmp_path / "server.key")


@pytest.fixture
def mosquitto_tls(tls_files: TlsFiles) -> Iterator[Mosquitto]:
    """Mosquitto with a TLS listener (``mqtts://``); ``.tls.cafile`` verifies it."""
    with Mosquitto(tls=tls_files) as broker:
        yield broker

