"""The control-plane connection: one paho-mqtt client, speaking sealed messages.

:class:`ControlClient` is the only place that knows MQTT. It connects (``mqtt://`` or
``mqtts://``, username/password, TLS files, a last will), sets ``TCP_NODELAY`` on its socket
(paho does not; without it each round trip waits 40-90 ms for Nagle's algorithm), runs
paho's network loop in paho's own thread, reconnects by itself and subscribes again after a
reconnect. Outgoing bodies are sealed (signed envelope, :func:`protocol.seal`); incoming
payloads are handed to the owner's handler as raw bytes, because the owner unseals them
(so it can count a rejection by its reason and answer it).

MQTT 3.1.1 is used throughout: the embedded amqtt broker speaks nothing newer.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgeswarm.device_agent import protocol
from edgeswarm.placement.errors import Error, InvalidInput

log = logging.getLogger("edgeswarm.agent.control")

Handler = Callable[[str, bytes], None]
Clock = Callable[[], float]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class ConnectError(Error):
    """The broker could not be reached, refused us, or the TLS handshake failed."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the broker connection: a CA to trust (None: the system's), a client pair."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.ca) if self.ca else None)
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("TLS: give both --tls-cert and --tls-key, or neither")
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_uri(uri: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]`` (ports default to 1883 / 8883)."""
    parts = urlsplit(uri)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise InvalidInput(f"broker URI {uri!r} must look like mqtt://HOST:PORT or "
                           f"mqtts://HOST:PORT")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise InvalidInput(f"broker URI {uri!r} has a bad port") from None
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise InvalidInput(f"broker URI {uri!r}: give only scheme, host and port (credentials "
                           f"go in --username/--password-file)")
    return BrokerAddress(parts.scheme, parts.hostname, port)


class ControlClient:
    """One MQTT connection: sealed publishes, raw-bytes subscriptions, automatic reconnects."""

    def __init__(self, broker_uri: str, client_id: str, *, key: bytes,
                 username: str | None = None, password: str | None = None,
                 tls: TlsConfig | None = None, will: tuple[str, bytes] | None = None,
                 clock: Clock = time.time, connect_timeout_s: float = 5.0,
                 sender: str | None = None, keepalive_s: int = 5) -> None:
        self.address = parse_uri(broker_uri)
        self.client_id = client_id
        self.sender = sender or client_id
        self._key = key
        self._clock = clock
        self._timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._lock = threading.Lock()
        self._handlers: dict[str, Handler] = {}
        self._connect_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._first_connack = threading.Event()
        self._connack_reason = ""
        self._started = False
        self._stopping = False
        self._suback: dict[int, threading.Event] = {}
        self._resubscribed: list[threading.Event] = []

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.connect_timeout = connect_timeout_s
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        if username is not None:
            client.username_pw_set(username, password)
        if self.address.scheme == "mqtts" or tls is not None:
            client.tls_set_context((tls or TlsConfig()).context())
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_socket_open = _nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self._client = client

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Connect and wait for the broker's CONNACK; raise ConnectError naming the broker."""
        if self._started:
            raise InvalidInput("ControlClient.start() was already called; make a new client")
        self._started = True
        where = self.address.uri
        try:
            self._client.connect(self.address.host, self.address.port, self._keepalive)
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with the MQTT broker {where} failed: {exc}; "
                               f"check --tls-ca (the CA that signed the broker's certificate) "
                               f"and the host name in the URI") from exc
        except TimeoutError as exc:
            raise ConnectError(f"the MQTT broker {where} did not answer within "
                               f"{self._timeout:.1f} s; is it running and reachable?") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to the MQTT broker {where}: {exc}; is it "
                               f"running? (or use --embedded-broker)") from exc
        self._client.loop_start()
        if not self._first_connack.wait(self._timeout) or not self._connected.is_set():
            reason = self._connack_reason or f"no CONNACK within {self._timeout:.1f} s"
            self.stop()
            hint = ("; check --username and --password-file"
                    if "password" in reason.lower() or "authori" in reason.lower() else "")
            raise ConnectError(f"the MQTT broker {where} refused the connection: "
                               f"{reason}{hint}")
        deadline = time.monotonic() + self._timeout
        for done in self._resubscribed:  # filters given before start(): acknowledged now
            done.wait(max(0.0, deadline - time.monotonic()))
        log.debug("connected to %s as %s", where, self.client_id)

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and join paho's thread."""
        if self._stopping:
            return
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> ControlClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (in paho's thread) after every successful (re)connect."""
        with self._lock:
            self._connect_hooks.append(hook)

    # -- messages --------------------------------------------------------------------
    def seal(self, topic: str, body: protocol.Model) -> bytes:
        """The signed envelope that :meth:`publish` would send (the will is made with it)."""
        return protocol.seal(self._key, topic, self.sender, body, self._clock())

    def publish(self, topic: str, body: protocol.Model, retain: bool = False, qos: int = 1,
                wait: bool = False) -> None:
        """Seal ``body`` for ``topic`` and publish it; ``wait`` blocks until the broker has it."""
        self.publish_raw(topic, self.seal(topic, body), retain=retain, qos=qos, wait=wait)

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1,
                    wait: bool = False) -> None:
        """Publish bytes as they are (tests use it to send what a peer must reject)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise ConnectError(f"publishing to {topic!r} on {self.address.uri} failed: "
                               f"{mqtt.error_string(info.rc)}")
        if wait:
            try:
                info.wait_for_publish(self._timeout)
            except (RuntimeError, ValueError) as exc:
                raise ConnectError(f"publishing to {topic!r} on {self.address.uri} failed: "
                                   f"{exc}") from exc
            if not info.is_published():
                raise ConnectError(f"the MQTT broker {self.address.uri} did not acknowledge a "
                                   f"message on {topic!r} within {self._timeout:.1f} s")

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter``.

        Blocks until the broker acknowledged the subscription when connected. The handler
        runs in paho's thread; an exception in it is logged, never kills the loop.
        """
        with self._lock:
            self._handlers[topic_filter] = handler
        self._client.message_callback_add(topic_filter, self._dispatch(handler))
        if self._connected.is_set():
            self._subscribe_and_wait(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
        self._client.message_callback_remove(topic_filter)
        self._client.unsubscribe(topic_filter)

    # -- paho callbacks (paho's thread) ----------------------------------------------
    def _subscribe_and_wait(self, topic_filter: str, qos: int) -> None:
        done = threading.Event()
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos=qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._suback[mid] = done
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("subscribe %s deferred until reconnect: %s", topic_filter,
                      mqtt.error_string(rc))
            return
        if threading.current_thread() is not getattr(self._client, "_thread", None) and \
                not done.wait(self._timeout):
            log.warning("the MQTT broker %s did not acknowledge the subscription to %s "
                        "within %.1f s", self.address.uri, topic_filter, self._timeout)

    def _dispatch(self, handler: Handler) -> Callable[..., None]:
        def on_message(_client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                handler(msg.topic, bytes(msg.payload))
            except Exception:
                log.exception("handler for %s failed", msg.topic)
        return on_message

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason: Any, _properties: Any) -> None:
        if reason.is_failure:
            self._connack_reason = str(reason)
            self._first_connack.set()
            log.warning("the MQTT broker %s refused the connection: %s", self.address.uri,
                        reason)
            return
        with self._lock:
            filters = list(self._handlers)
            hooks = list(self._connect_hooks)
            pending = []
            for topic_filter in filters:  # subscriptions do not survive a clean session
                rc, mid = client.subscribe(topic_filter, qos=1)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._suback[mid] = threading.Event()
                    pending.append(self._suback[mid])
            self._resubscribed = pending
        self._connected.set()
        self._first_connack.set()
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("on-connect hook failed")

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason: Any, _properties: Any) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning("lost the connection to the MQTT broker %s (%s); reconnecting",
                        self.address.uri, reason)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                      _reasons: Any, _properties: Any) -> None:
        with self._lock:
            done = self._suback.pop(mid, None)
        if done is not None:
            done.set()


def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle's algorithm on paho's socket (a TLS socket forwards setsockopt)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # a unix socket or websocket wrapper
        log.debug("could not set TCP_NODELAY: %s", exc)
