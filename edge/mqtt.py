"""A thin adapter that turns paho-mqtt into awaitables on the asyncio loop.

paho's network loop is driven by the event loop itself (reader/writer
callbacks on the socket, as aiomqtt does), so callbacks run on the loop
thread and publishing costs no thread hand-off. Each connection object is
used once: the uplink builds a new one for every attempt.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.errors import UplinkError
from edge.tls import Login, TlsFiles, client_context, explain

__all__ = [
    "Closed",
    "Connack",
    "Inbound",
    "MqttConnection",
    "PublishResult",
    "publish_packet_size",
]

log = logging.getLogger("edge.mqtt")


@dataclass(frozen=True, slots=True)
class Connack:
    """What the broker told us when it accepted the connection."""

    session_present: bool
    max_packet_size: int | None
    receive_maximum: int | None  # QoS1 publishes the broker takes unacknowledged at once


@dataclass(frozen=True, slots=True)
class Closed:
    """How a connection ended."""

    reason: str
    by_peer: bool  # the broker or the network ended it, not this side's keepalive or abort
    code: int | None = None  # the reason code of a DISCONNECT the broker sent (MQTT 5)


_TAKEN_OVER = 0x8E
_NOT_AUTHORISED = {0x86, 0x87}  # bad user name or password; not authorized


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The broker's answer to one QoS1 publish."""

    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message the broker delivered to us; QoS 1 ones wait for `MqttConnection.ack`."""

    mid: int
    topic: str
    payload: bytes
    qos: int
    content_type: str | None = None  # MQTT 5 content type
    expiry: float | None = None  # MQTT 5 message expiry interval, seconds
    retain: bool = False  # sent because it is retained (3.1.1: at a (re)subscription)


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload: bytes, *, v5: bool, qos: int = 1) -> int:
    """Bytes a PUBLISH packet takes on the wire (no properties)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + len(payload)
    return 1 + _varint_len(remaining) + remaining


class _BufferedClient(paho.Client):
    """paho with fewer system calls: one recv fills a buffer, and writes are gathered.

    paho reads a packet in three recv calls or more (type, length, body) and
    sends each packet with its own send. Here a recv takes what the kernel
    has, paho's small reads are served from it, and while `corked` paho's
    sends go into one buffer that `uncork` writes with a single send.
    """

    _READ = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._corked = False
        self.tls_failure: ssl.SSLError | None = None  # why TLS ended the link, if it did

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            try:
                data = super()._sock_recv(self._READ)  # BlockingIOError when there is none
            except ssl.SSLError as exc:
                # TLS 1.3: the broker refuses our certificate with an alert after the
                # handshake; paho would only say "connection lost".
                self.tls_failure = exc
                raise
            if not data:
                return data  # end of stream
            pending = getattr(self._sock, "pending", None)  # TLS: decrypted, not yet read
            while pending is not None and pending() > 0:
                data += super()._sock_recv(self._READ)
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        # paho's own wrap leaves the socket to the garbage collector when the handshake
        # fails. The host name is checked by the context (check_hostname), against the
        # url's host, which also goes out as SNI. Runs in connect()'s worker thread.
        assert self._ssl_context is not None
        sock = self._ssl_context.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            sock.settimeout(self._connect_timeout)
            sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        return sock

    def buffered(self) -> bool:
        """Whether bytes read from the socket still wait for paho."""
        return self._rpos < len(self._rbuf)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._corked:
            self._wbuf += buf
            return len(buf)
        return super()._sock_send(buf)

    def cork(self) -> None:
        self._corked = True

    def uncork(self) -> bool:
        """Write what was gathered; True when all of it went (else the rest waits)."""
        self._corked = False
        while self._wbuf:
            try:
                sent = super()._sock_send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                return False
            except (OSError, ConnectionError, AttributeError, ValueError):
                self._wbuf.clear()  # the link is gone: paho sees it on its next read
                return True
            del self._wbuf[:sent]
        return True

    linger: Callable[[Any], None] | None = None  # set: takes the socket instead of a close

    def _sock_close(self) -> None:
        self.uncork()  # a DISCONNECT may still be in the buffer
        self._wbuf.clear()
        sock = self._sock
        if self.linger is None or sock is None:
            super()._sock_close()
            return
        # A close with unread bytes sends a reset, and the peer's kernel may then drop
        # what we sent last (PUBACKs, the DISCONNECT): let the owner drain it first.
        self._sock = None
        try:
            self._call_socket_unregister_write(sock)
            self._call_socket_close(sock)
        finally:
            self.linger(sock)


class MqttConnection:
    """One MQTT connection to one broker, from CONNECT to its end."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        keepalive: float,
        v5: bool = True,
        session_expiry: float = 0,
        will: tuple[str, bytes] | None = None,
        max_inflight: int = 100,
        connect_timeout: float = 10.0,
        clean: bool = False,
        receive_maximum: int | None = None,
        max_packet_size: int | None = None,
        on_message: Callable[[Inbound], None] | None = None,
        tls: TlsFiles | None = None,
        login: Login | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.v5 = v5
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.clean = clean
        self.receive_maximum = receive_maximum
        self.max_packet_size = max_packet_size  # MQTT 5: the broker sends nothing larger
        self.tls = tls  # mqtts://: the files are read at connect()
        self.login = login
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else clean,
            # Inbound QoS 1 messages are acknowledged by the owner, once they are safe.
            manual_ack=True,
        )
        self._client.connect_timeout = connect_timeout
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_subscribe  # the same: codes for a mid
        self._client.on_message = self._on_message
        self._deliver = on_message
        self._client.on_socket_open = self._on_socket_open
        self._client.on_socket_close = self._on_socket_close
        self._client.on_socket_register_write = self._on_register_write
        self._client.on_socket_unregister_write = self._on_unregister_write
        self._connack: asyncio.Future[Connack] = self._loop.create_future()
        self._closed: asyncio.Future[Closed] = self._loop.create_future()
        self._aborting = False
        self._pending: dict[int, Callable[[PublishResult], None]] = {}
        self._subscribing: dict[int, asyncio.Future[list[int]]] = {}
        self._sock: Any = None
        self._misc: asyncio.TimerHandle | None = None
        self._write_scheduled = False
        self._writer_on = False  # a writer callback waits for room in the socket buffer
        self._reading_paused = False
        self._drain_finish: Callable[[], None] | None = None  # closes a socket being drained
        self.last_inbound = time.monotonic()
        self._probe_sent_at: float | None = None

    # ---- paho callbacks: all of them only hand results to futures ---------------

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def attach() -> None:
            self._sock = sock
            if not self._reading_paused:
                self._loop.add_reader(sock, self._readable)
            self._schedule_misc()
        self._in_loop(attach)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def detach() -> None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            self._writer_on = False
            self._sock = None
        self._in_loop(detach)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho has a packet to send: send everything queued once this loop turn ends,
        # so that many packets share one send.
        self._in_loop(self._write_soon)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        pass  # the writer callback is ours to manage (see _writable)

    def _write_soon(self) -> None:
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._writable)

    def _readable(self) -> None:
        self.last_inbound = time.monotonic()
        self._probe_sent_at = None
        client = self._client
        client.loop_read()
        while client.buffered() and client.socket() is not None:
            client.loop_read()  # paho stops after a few packets; the rest are read already

    def _writable(self) -> None:
        self._write_scheduled = False
        client = self._client
        sock = client.socket()
        if sock is None:
            return
        flushed = client.uncork()  # what a full socket buffer held back last time first
        if flushed:
            client.cork()
            client.loop_write()  # corked, paho hands over every queued packet
            flushed = client.uncork()
        if not flushed:
            if not self._writer_on:
                self._loop.add_writer(sock, self._writable)  # the kernel's buffer is full
                self._writer_on = True
            return
        if self._writer_on:
            self._loop.remove_writer(sock)
            self._writer_on = False
        if client.want_write():
            self._write_soon()  # paho kept some back (it could not take them just now)

    def _schedule_misc(self) -> None:
        self._misc = self._loop.call_later(1.0, self._run_misc)

    def _run_misc(self) -> None:
        if self._closed.done():
            return
        self._client.loop_misc()
        self._schedule_misc()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        if self._connack.done():
            return
        if rc.is_failure:
            self._connack.set_exception(UplinkError(self._refusal(rc)))
            return
        max_size = getattr(props, "MaximumPacketSize", None) if props is not None else None
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self._connack.set_result(Connack(bool(flags.session_present), max_size, receive_max))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        code: int | None = None
        if flags.is_disconnect_packet_from_server:
            code = int(rc.value)
            reason = f"the broker disconnected: {rc} (0x{code:02x})"
            if code == _TAKEN_OVER:
                reason += (
                    f"; another client connected with the same client id {client._client_id!r}"
                    " (is the node id unique? cloned images share /etc/machine-id)"
                )
        elif str(rc) == "Unspecified error":
            # What paho says when the socket simply closed: give the user the likely story.
            reason = "connection lost: the broker closed it, or the network between failed"
        else:
            reason = f"connection lost: {rc}"
        by_peer = not self._aborting and "keep alive" not in str(rc).lower()
        failure = self._client.tls_failure
        before = "before CONNACK: "
        if failure is not None and self.tls is not None:
            reason, before = explain(failure, self.tls, self.host, self.port), ""
        if not self._connack.done():
            self._connack.set_exception(UplinkError(f"{before}{reason}"))
        if not self._closed.done():
            self._closed.set_result(Closed(reason, by_peer, code))
        if self._misc is not None:
            self._misc.cancel()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Properties
    ) -> None:
        done = self._pending.pop(mid, None)
        if done is not None:
            done(PublishResult(not rc.is_failure, "" if not rc.is_failure else str(rc)))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: Any,
        props: Properties | None,
    ) -> None:
        fut = self._subscribing.pop(mid, None)
        if fut is not None and not fut.done():
            # An UNSUBACK of MQTT 3.1.1 carries no codes at all.
            fut.set_result([int(code.value) for code in codes] if isinstance(codes, list) else [])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        content_type = getattr(props, "ContentType", None) if props is not None else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        inbound = Inbound(
            msg.mid, msg.topic, bytes(msg.payload), msg.qos,
            content_type if isinstance(content_type, str) else None,
            float(expiry) if isinstance(expiry, int) else None,
            bool(msg.retain),
        )
        if self._deliver is None:
            self.ack(inbound)  # nobody asked for messages: do not hold the broker's window
        else:
            self._deliver(inbound)

    def _refusal(self, rc: ReasonCode) -> str:
        message = f"broker refused the connection: {rc}"
        if int(rc.value) in _NOT_AUTHORISED:
            if self.login is not None:
                who = self.login.describe()
            elif self.tls is not None and self.tls.cert_file is not None:
                who = f"identity from {self.tls.names[1]} {self.tls.cert_file}"
            else:
                who = "no user name or certificate (does the broker allow anonymous clients?)"
            message = (f"broker refused the connection: not authorised ({rc},"
                       f" 0x{int(rc.value):02x}); {who}")
        return message

    def _open(self, **connect_args: Any) -> None:
        """Read the TLS files and the password, then connect (blocking: in a thread)."""
        if self.tls is not None:
            self._client.tls_set_context(client_context(self.tls))
        if self.login is not None:
            self._client.username_pw_set(*self.login.read())
        self._client.connect(self.host, self.port, **connect_args)

    # ---- the awaitable surface ---------------------------------------------

    async def connect(self, timeout: float) -> Connack:
        """Open the TCP connection (and TLS), and wait for the CONNACK."""
        extra: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = int(self.session_expiry)
            if self.receive_maximum is not None:
                props.ReceiveMaximum = self.receive_maximum
            if self.max_packet_size is not None:
                props.MaximumPacketSize = self.max_packet_size
            extra = {"clean_start": self.clean, "properties": props}
        try:
            async with asyncio.timeout(timeout):
                # paho connects with blocking calls (DNS, TCP, the TLS handshake), and
                # the TLS files are read then: keep it all off the loop.
                await asyncio.to_thread(
                    self._open, keepalive=max(1, round(self.keepalive)), **extra,
                )
                return await asyncio.shield(self._connack)
        except ssl.SSLError as exc:
            self.abort()
            assert self.tls is not None  # no TLS is spoken without it
            raise UplinkError(explain(exc, self.tls, self.host, self.port)) from exc
        except (OSError, TimeoutError) as exc:
            self.abort()
            why = str(exc) or "timed out"
            if self.tls is not None and isinstance(exc, ConnectionResetError):
                # A plain MQTT listener reads the TLS hello as garbage and drops it.
                why += ("; is it a TLS listener? (mqtts:// needs one; plain MQTT is usually"
                        " port 1883)")
            raise UplinkError(f"cannot connect to {self.host}:{self.port}: {why}") from exc
        except (UplinkError, asyncio.CancelledError):
            self.abort()  # no half-open socket left behind
            raise

    def send(
        self,
        topic: str,
        payload: bytes,
        done: Callable[[PublishResult], None],
        *,
        retain: bool = False,
        content_type: str | None = None,
        expiry: float | None = None,
    ) -> bool:
        """Send a QoS1 PUBLISH; `done` is called on the loop with the broker's PUBACK.

        Returns False (and never calls `done`) when the connection cannot take it.
        `content_type` and `expiry` (seconds) travel as MQTT 5 properties.
        """
        props: Properties | None = None
        if self.v5 and (content_type is not None or expiry is not None):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if content_type is not None:
                props.ContentType = content_type
            if expiry is not None:
                props.MessageExpiryInterval = max(1, min(0xFFFFFFFF, round(expiry)))
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        self._pending[info.mid] = done
        return True

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False,
        content_type: str | None = None, expiry: float | None = None,
    ) -> asyncio.Future[PublishResult]:
        """Send a QoS1 PUBLISH; the future resolves on its PUBACK."""
        fut: asyncio.Future[PublishResult] = self._loop.create_future()

        def done(result: PublishResult) -> None:
            if not fut.done():
                fut.set_result(result)

        if not self.send(
            topic, payload, done, retain=retain, content_type=content_type, expiry=expiry
        ):
            fut.set_result(PublishResult(False, "not sent: the connection is closing"))
        return fut

    async def subscribe(
        self, filters: Sequence[str], *, no_local: bool = False, retain_once: bool = False,
        timeout: float = 10.0,
    ) -> list[int]:
        """Subscribe with QoS 1 and wait for the SUBACK; returns its reason codes.

        MQTT 5 options: `no_local` keeps the broker from sending us our own
        publishes; `retain_once` asks for retained messages only when the
        subscription is new (not on every reconnect of a kept session).
        """
        topics: Any
        if self.v5:
            options = SubscribeOptions(qos=1, noLocal=no_local, retainHandling=int(retain_once))
            topics = [(f, options) for f in filters]
        else:
            topics = [(f, 1) for f in filters]
        rc, mid = self._client.subscribe(topics)
        codes = await self._acknowledged(rc, mid, "subscribe to", filters, timeout)
        failed = [f for f, code in zip(filters, codes, strict=False) if code >= 0x80]
        if failed:
            raise UplinkError(f"the broker refused the subscription to {', '.join(failed)}")
        return codes

    async def unsubscribe(self, filters: Sequence[str], *, timeout: float = 10.0) -> None:
        """Drop subscriptions and wait for the UNSUBACK."""
        rc, mid = self._client.unsubscribe(list(filters))
        await self._acknowledged(rc, mid, "unsubscribe from", filters, timeout)

    async def _acknowledged(
        self, rc: int, mid: int | None, what: str, filters: Sequence[str], timeout: float
    ) -> list[int]:
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise UplinkError(f"cannot {what} {', '.join(filters)}: {paho.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._subscribing[mid] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise UplinkError(
                f"no answer to {what} {', '.join(filters)} within {timeout:.0f}s"
            ) from None
        finally:
            self._subscribing.pop(mid, None)

    def ack(self, message: Inbound) -> None:
        """Acknowledge a delivered message (PUBACK for QoS 1); a closed link ignores it."""
        if message.qos > 0 and not self._closed.done():
            self._client.ack(message.mid, message.qos)

    @property
    def closed(self) -> asyncio.Future[Closed]:
        """Resolves with how the connection ended."""
        return self._closed

    def pause_reading(self) -> None:
        """Read nothing more for now: TCP flow control makes the broker wait."""
        if not self._reading_paused:
            self._reading_paused = True
            if self._sock is not None and not self._aborting:  # never the goodbye's drain
                self._loop.remove_reader(self._sock)

    def resume_reading(self) -> None:
        """Read again after `pause_reading()`."""
        if self._reading_paused:
            self._reading_paused = False
            if self._sock is not None and not self._aborting:
                self._loop.add_reader(self._sock, self._readable)
                self._loop.call_soon(self._readable)  # what was buffered meanwhile

    def probe(self) -> None:
        """Ask the broker for a sign of life (PINGREQ) unless one is already out."""
        if self._probe_sent_at is None and not self._closed.done():
            self._probe_sent_at = time.monotonic()
            # paho only pings after a whole keepalive of silence; the uplink wants to
            # know sooner, so it asks for the ping itself (paho has no public call).
            self._client._send_pingreq()

    def abort(self, reason: str = "aborted") -> None:
        """Drop the connection at once, without a DISCONNECT (the peer may be gone)."""
        if not self._closed.done():
            self._closed.set_result(Closed(reason, by_peer=False))
        self._aborting = True
        sock: Any = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._readable()  # let paho see the EOF and run its close path
        if self._misc is not None:
            self._misc.cancel()

    async def disconnect(self, timeout: float = 2.0) -> None:
        """Say goodbye with a DISCONNECT and wait briefly for the socket to close.

        After the DISCONNECT the socket is drained until the broker closes its side,
        so that it reads everything we sent before it (no reset).
        """
        if self._closed.done():
            return
        if self._client.socket() is None:
            self.abort("no socket left to say goodbye on")
            return
        self._aborting = True  # our own goodbye, not the broker's doing
        drained: asyncio.Future[None] = self._loop.create_future()
        self._client.linger = partial(self._drain_then_close, drained, timeout)
        self._client.disconnect()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)
                await asyncio.shield(drained)
        except TimeoutError:
            self.abort("disconnect timed out")
        finally:
            if self._drain_finish is not None:
                self._drain_finish()  # the socket is closed when this returns, whatever came

    def _drain_then_close(self, done: asyncio.Future[None], timeout: float, sock: Any) -> None:
        """Read and drop what the broker still sends until it closes, then close."""
        def finish() -> None:
            self._drain_finish = None
            self._loop.remove_reader(sock)
            timer.cancel()
            sock.close()
            if not done.done():
                done.set_result(None)

        def readable() -> None:
            try:
                if sock.recv(65536):
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            finish()  # end of stream (or an error): the broker has read all we sent

        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        timer = self._loop.call_later(timeout, finish)
        self._drain_finish = finish
        self._loop.add_reader(sock, readable)
