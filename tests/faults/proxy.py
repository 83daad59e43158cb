"""A TCP proxy a test controls, between clients (API, workers) and a broker.

    with FaultProxy(("127.0.0.1", redis_port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/9"
        proxy.cut()      # close every connection and refuse new ones (connection reset)
        proxy.freeze()   # keep connections open but forward nothing (a hung link)
        proxy.slow(0.2)  # forward with 200 ms added each way
        proxy.heal()     # back to normal
        proxy.retarget(("127.0.0.1", other_port))  # new connections go elsewhere (failover)

It runs its own event loop in a daemon thread; every method is safe to call from the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

__all__ = ["FaultProxy"]

_CHUNK = 65536


class FaultProxy:
    """Forwards TCP from `127.0.0.1:<port>` to `target`, with faults on demand."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "normal"
        """normal | cut | frozen | slow"""
        self.delay = 0.0
        self.accepted = 0
        """Connections accepted so far (a client that reconnects shows here)."""
        self.held = 0
        """Chunks read while frozen and not forwarded yet (0 once a heal has let them through)."""
        self._loop = asyncio.new_event_loop()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._healed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self._sock = sock

    # -- control (from the test's thread) ----------------------------------------------------

    def start(self) -> FaultProxy:
        """Start listening."""
        self._thread.start()
        self._call(self._start())
        return self

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until `heal()`."""
        self._call(self._set("cut"))

    def freeze(self) -> None:
        """Stop forwarding (connections stay open, bytes wait) until `heal()`."""
        self._call(self._set("frozen"))

    def slow(self, delay: float) -> None:
        """Add `delay` seconds to every chunk forwarded, each way."""
        self.delay = delay
        self._call(self._set("slow"))

    def heal(self) -> None:
        """Forward normally again (bytes held by a freeze flow on)."""
        self._call(self._set("normal"))

    def retarget(self, target: tuple[str, int]) -> None:
        """Send new connections to `target`, and reset the open ones (as a failover does)."""
        self.target = target
        self._call(self._drop_links())

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._links)

    def close(self) -> None:
        """Stop the proxy and close every connection."""
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # -- on the proxy's loop ---------------------------------------------------------------

    async def _start(self) -> None:
        self._healed.set()
        self._server = await asyncio.start_server(self._accept, sock=self._sock)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop_links()

    async def _set(self, mode: str) -> None:
        self.mode = mode
        if mode == "cut":
            self._healed.clear()
            await self._drop_links()
        elif mode == "frozen":
            self._healed.clear()
        else:
            self._healed.set()

    async def _drop_links(self) -> None:
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                transport = writer.transport
                with contextlib.suppress(Exception):
                    sock = transport.get_extra_info("socket")
                    if sock is not None:  # RST, as a broken link looks to the peer
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._links.discard(link)
            for w in link:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                writer.transport.abort()
                return
            if self.mode != "normal":
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                else:
                    self.held += 1
                    try:
                        await self._healed.wait()
                        if writer.transport.is_closing():
                            return
                        writer.write(data)
                    finally:
                        self.held -= 1
                    await writer.drain()
                    continue
            writer.write(data)
            await writer.drain()
