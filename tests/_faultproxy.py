"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1 with a scripted (or seeded) plan per request.

Each incoming request takes the next action of the plan (then ``default``):

``ok``            forward to the upstream and return its answer
``503`` / ``503:R`` answer 503 (with ``Retry-After: R``), nothing forwarded
``401``           answer 401 with ``WWW-Authenticate``, nothing forwarded
``status:N``      answer status N with an empty body
``drop``          read part of the request body, then close the connection (FIN)
``reset``         read the request head, then reset the connection (RST, SO_LINGER 0)
``delay:S``       read the request, stall S seconds, then forward and answer (too late for a
                  client with a shorter read timeout: the instance still arrives)
``lost-reply``    forward the request (the upstream stores it), then drop the reply
``blackhole``     read the request, then never answer (the connection stays open)
``noread``        read the request head, then nothing more, never answer (the client's write
                  blocks once the socket buffers are full)
``drip:S``        forward the request, then send the upstream's reply one byte every S seconds
``empty200``      read the request, answer 200 with an empty body, nothing forwarded
``html200``       read the request, answer 200 with an HTML page (a captive portal), nothing
                  forwarded
``xml``           forward, asking for DICOM XML instead of JSON on a POST (STOW-RS): a 200 that
                  is a proper STOW-RS response, but not JSON
``refuse:K``      forward; in a STOW-RS JSON reply move every K-th acknowledged instance to the
                  FailedSOPSequence (Failure Reason 0xC000) and answer 202
``corrupt``       forward the request with one byte of its body flipped (damaged in transit)

One request per connection (the proxy answers with ``Connection: close``). With ``keep_host``
the client's ``Host`` header is forwarded (signed requests, such as S3's, need it).
``requests`` records ``(monotonic time, method, path, action)`` for every request the proxy
received.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "ProxyRequest", "seeded_plan"]


@dataclass(frozen=True)
class ProxyRequest:
    at: float
    method: str
    path: str
    action: str
    headers: dict[str, str]


def seeded_plan(seed: int, n: int, weights: dict[str, float]) -> list[str]:
    """``n`` actions drawn with ``weights`` from a seeded RNG (reproducible fault schedules)."""
    rng = random.Random(seed)
    names = list(weights)
    return rng.choices(names, weights=[weights[k] for k in names], k=n)


class FaultProxy:
    """Run with ``with FaultProxy(upstream, plan=[...]) as p: ... p.url ...``."""

    def __init__(
        self,
        upstream: str,
        *,
        plan: Sequence[str] | Callable[[int], str] = (),
        default: str = "ok",
        rcvbuf: int | None = None,
        keep_host: bool = False,
    ) -> None:
        parts = urlsplit(upstream)
        self.rcvbuf = rcvbuf
        self.up_host = parts.hostname or "127.0.0.1"
        self.up_port = parts.port or 80
        self._plan = plan
        self.default = default
        #: Forward the client's Host header (a signed request, like S3's SigV4, needs it).
        self.keep_host = keep_host
        self.requests: list[ProxyRequest] = []
        self._held: set[asyncio.StreamWriter] = set()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultproxy", daemon=True
        )
        self.port = 0

    # -- control -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_plan(
        self, plan: Sequence[str] | Callable[[int], str], default: str | None = None
    ) -> None:
        with self._lock:
            self._plan = plan
            self.requests.clear()
            if default is not None:
                self.default = default

    def count(self, action: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if action is None or r.action == action)

    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)
        return self

    async def _start(self) -> None:
        self._forever = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            # Small receive buffers (inherited by accepted sockets): a client writing to a
            # connection nobody reads blocks after a few kB instead of megabytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._handle, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.05)  # let the closed transports finish closing

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- per connection ----------------------------------------------------------------------
    def _next_action(self, method: str, path: str, headers: dict[str, str]) -> str:
        with self._lock:
            i = len(self.requests)
            if callable(self._plan):
                action = self._plan(i)
            else:
                action = self._plan[i] if i < len(self._plan) else self.default
            self.requests.append(ProxyRequest(time.monotonic(), method, path, action, headers))
            return action

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        action = self._next_action(method, path, headers)

        if action == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if action == "drop":
            length = int(headers.get("content-length", "0") or 0)
            want = max(1, length // 2) if length else 65536
            with contextlib.suppress(asyncio.IncompleteReadError):
                await reader.readexactly(want)
            writer.close()
            return

        if action == "noread":
            writer.transport.pause_reading()
            # Held until stop: a paused transport is out of the selector, so without these
            # references the task, its transport and writer would be garbage, never closed.
            self._held.add(writer)
            await self._forever.wait()
        body = await self._read_body(reader, headers)
        if action == "blackhole":
            await reader.read()  # until the client closes the connection
            return
        if action in ("empty200", "html200"):
            await self._answer_200(writer, action)
            return
        if action.startswith("503") or action == "401" or action.startswith("status:"):
            await self._answer_status(writer, action)
            return
        if action.startswith("delay:"):
            await asyncio.sleep(float(action.split(":", 1)[1]))
        elif action == "xml" and method == "POST":
            headers = {**headers, "accept": "application/dicom+xml"}
        elif action == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        elif action not in ("ok", "lost-reply", "xml", "corrupt") and not action.startswith(
            ("drip:", "refuse:")
        ):
            raise ValueError(f"unknown fault proxy action {action!r}")
        reply = await self._forward(method, path, headers, body)
        if action.startswith("refuse:") and method == "POST":
            reply = _refuse_every(reply, int(action.split(":", 1)[1]))
        if action == "lost-reply":
            writer.transport.abort()
            return
        if action.startswith("drip:"):
            pause = float(action.split(":", 1)[1])
            for i in range(len(reply)):
                writer.write(reply[i : i + 1])
                await writer.drain()
                await asyncio.sleep(pause)
            return
        writer.write(reply)
        await writer.drain()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            return b"".join(chunks)
        length = int(headers.get("content-length", "0") or 0)
        return await reader.readexactly(length) if length else b""

    @staticmethod
    async def _answer_status(writer: asyncio.StreamWriter, action: str) -> None:
        extra = ""
        if action.startswith("503"):
            status, reason = 503, "Service Unavailable"
            if ":" in action:
                extra = f"Retry-After: {action.split(':', 1)[1]}\r\n"
        elif action == "401":
            status, reason = 401, "Unauthorized"
            extra = 'WWW-Authenticate: Basic realm="Orthanc Secure Area"\r\n'
        else:
            status, reason = int(action.split(":", 1)[1]), "Injected"
        head = (
            f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()

    @staticmethod
    async def _answer_200(writer: asyncio.StreamWriter, action: str) -> None:
        body = b""
        ctype = ""
        if action == "html200":
            body = (
                b"<!DOCTYPE html><html><head><title>Network login</title></head><body>"
                b"<h1>Welcome</h1><p>Please accept the terms of use to continue.</p></body></html>"
            )
            ctype = "Content-Type: text/html; charset=utf-8\r\n"
        head = f"HTTP/1.1 200 OK\r\n{ctype}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()

    async def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        up_r, up_w = await asyncio.open_connection(self.up_host, self.up_port)
        try:
            skip = {"transfer-encoding", "content-length", "connection", "keep-alive", "host"}
            host = headers.get("host") if self.keep_host else None
            out = [f"{method} {path} HTTP/1.1", f"Host: {host or f'{self.up_host}:{self.up_port}'}"]
            out += [f"{k}: {v}" for k, v in headers.items() if k not in skip]
            out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            up_w.write("\r\n".join(out).encode("latin-1") + body)
            await up_w.drain()
            head = await up_r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            resp_headers = [ln for ln in lines[1:] if ln]
            length: int | None = None
            for ln in resp_headers:
                k, _, v = ln.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            payload = await (up_r.readexactly(length) if length is not None else up_r.read())
            kept = [
                ln
                for ln in resp_headers
                if ln.partition(":")[0].strip().lower()
                not in ("connection", "keep-alive", "content-length", "transfer-encoding")
            ]
            new_head = [
                lines[0],
                *kept,
                f"Content-Length: {len(payload)}",
                "Connection: close",
                "",
                "",
            ]
            return "\r\n".join(new_head).encode("latin-1") + payload
        finally:
            up_w.close()


def _refuse_every(reply: bytes, k: int) -> bytes:
    """A STOW-RS JSON reply with every ``k``-th acknowledged instance moved to the
    FailedSOPSequence (Failure Reason 0xC000, "cannot understand") and the status 202."""
    import json

    head, _, payload = reply.partition(b"\r\n\r\n")
    try:
        doc = json.loads(payload)
        acked = doc["00081199"]["Value"]
    except (ValueError, KeyError, TypeError):
        return reply
    failed = [dict(item, **{"00081197": {"vr": "US", "Value": [0xC000]}}) for item in acked[::k]]
    doc["00081199"]["Value"] = [item for i, item in enumerate(acked) if i % k]
    doc["00081198"] = {"vr": "SQ", "Value": failed}
    body = json.dumps(doc).encode()
    lines = head.decode("latin-1").split("\r\n")
    kept = [ln for ln in lines[1:] if ln.partition(":")[0].strip().lower() != "content-length"]
    new_head = ["HTTP/1.1 202 Accepted", *kept, f"Content-Length: {len(body)}"]
    return "\r\n".join(new_head).encode("latin-1") + b"\r\n\r\n" + body
