"""Cluster key files: written 0600, never overwritten by accident, read back strictly."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from edgeswarm.device_agent import keys
from edgeswarm.placement.errors import InvalidInput


def test_generate_is_32_fresh_bytes() -> None:
    a, b = keys.generate(), keys.generate()
    assert len(a) == len(b) == 32 and a != b


def test_write_then_read(tmp_path: Path) -> None:
    key = keys.generate()
    path = keys.write(tmp_path / "cluster.key", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.hex() + "\n"
    assert keys.read(path) == key


def test_write_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    first, second = keys.generate(), keys.generate()
    keys.write(path, first)
    with pytest.raises(InvalidInput, match="already exists"):
        keys.write(path, second)
    assert keys.read(path) == first
    path.chmod(0o644)
    keys.write(path, second, force=True)
    assert keys.read(path) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.key"]   # no temp file left


def test_write_checks_the_key_and_the_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        keys.write(tmp_path / "k", b"short")
    with pytest.raises(InvalidInput, match="cannot create"):
        keys.write(tmp_path / "missing-dir" / "k", keys.generate())


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds 0 bytes"),
    (b"ab" * 31 + b"\n", "holds 31 bytes"),
    (b"ab" * 33, "holds 33 bytes"),
    (b"zz" * 32, "not hex"),
    (b"\xff" * 64, "not hex"),
    (b"ab" * 1000, "not hex|holds"),
])
def test_read_rejects_bad_content(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(InvalidInput, match=message):
        keys.read(path)


def test_read_names_a_missing_file_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"does not exist.*edgeswarm keygen"):
        keys.read(tmp_path / "nope.key")
    with pytest.raises(InvalidInput, match="not a regular file"):
        keys.read(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_read_names_an_unreadable_file(tmp_path: Path) -> None:
    path = keys.write(tmp_path / "k", keys.generate())
    path.chmod(0)
    with pytest.raises(InvalidInput, match="cannot read"):
        keys.read(path)


def test_read_warns_when_others_can_read(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    key = keys.generate()
    path = keys.write(tmp_path / "k", key)
    with caplog.at_level(logging.WARNING, logger="edgeswarm.agent.keys"):
        assert keys.read(path) == key
    assert caplog.records == []
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="edgeswarm.agent.keys"):
        assert keys.read(path) == key
    assert "chmod 600" in caplog.text
