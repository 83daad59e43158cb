"""Publishing to RabbitMQ: one thread owns the connection; batches are group-committed.

py-amqp is blocking, so the event loop hands batches to a dedicated thread through a queue and
awaits a future. The thread takes every batch waiting, writes them all on one channel in
publisher-confirm mode (one socket write, see _amqp_wire), then waits once for the broker's
confirms: many concurrent requests cost one round trip together, and a resolved future means
RabbitMQ has the messages.

A failover list (`amqp://h1;amqp://h2`) is kombu's: the thread keeps one kombu Connection for
its life, and when connecting to its current host fails, moves on with the Connection's own
`maybe_switch_next()` (its `failover_strategy`, Celery's `broker_failover_strategy`), trying
each host once within the requests' dispatch deadline. The Connection remembers where it is, so
the next reconnection starts from the host that worked.

A batch whose request gave up (dispatch timeout) before the thread wrote it is withdrawn: it is
never written, however long connecting took. A batch is written once: when the link fails after
its bytes left, it is reported failed, not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskbridge.backends import dispatch_deadline, redact_url

from ._amqp_wire import publish_frames
from ._protocol import TaskMessage

__all__ = ["AmqpPublisher", "PublishError"]

logger = logging.getLogger("taskbridge.celery")


class PublishError(Exception):
    """The broker did not take a batch (nack, unroutable, no confirm in time)."""


@dataclass(slots=True)
class _Job:
    messages: Sequence[TaskMessage]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    probe: bool = False
    deadline: float = 0.0
    """When its request gives up (epoch seconds, `dispatch_deadline()`); outside a dispatch (a
    ping), the broker connection timeout from its submission."""
    state: str = "waiting"
    """waiting -> taken (the thread connects for it) -> written (its bytes are about to leave);
    waiting or taken -> withdrawn (its request gave up first: it is never written). Changed
    under AmqpPublisher._claim only."""


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the caller gave up (dispatch timeout): nothing to tell it
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


@dataclass(slots=True)
class _Confirms:
    """Publisher-confirm bookkeeping for one channel."""

    next_tag: int = 1
    outstanding: set[int] = field(default_factory=set)
    nacked: int = 0
    returned: list[str] = field(default_factory=list)

    def on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.outstanding = {t for t in self.outstanding if t > tag}
        else:
            self.outstanding.discard(tag)

    def on_nack(self, tag: int, multiple: bool) -> None:
        before = len(self.outstanding)
        self.on_ack(tag, multiple)
        self.nacked += before - len(self.outstanding)

    def on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self.returned.append(routing_key)


class AmqpPublisher:
    """Sends task messages to an AMQP broker from a dedicated thread."""

    def __init__(
        self,
        connect: Callable[[], Any],
        declare: Callable[[Any, str], None],
        timeout: float,
        name: str,
        confirm: bool = True,
        declare_delayed: Callable[[Any, str], None] | None = None,
    ) -> None:
        """`connect()` returns a kombu Connection (not connected yet; made once, and kept
        across reconnections for its failover list); `declare(channel, queue)` declares a queue
        the way Celery does; `declare_delayed(connection, queue)` makes sure RabbitMQ's native
        delayed delivery reaches `queue` (see `_delayed`); `timeout` bounds each wait on the
        broker. Without `confirm` a batch counts as sent once written to the socket (Celery's
        own default)."""
        self._connect = connect
        self._confirm = confirm
        self._declare = declare
        self._declare_delayed = declare_delayed
        self._timeout = timeout
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._claim = threading.Lock()
        # Owned by the publisher thread only:
        self._connection: Any = None
        """The kombu Connection, kept for the thread's life (it knows the failover list)."""
        self._channel: Any = None
        """The publishing channel; None while not connected."""
        self._confirms = _Confirms()
        self._declared: set[str] = set()
        self._delayed_ready: set[str] = set()
        self._written = False

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a failed publish raises (mapped to BackendUnavailable by the backend)."""
        from amqp.exceptions import AMQPError  # type: ignore[import-untyped]
        from kombu.exceptions import KombuError  # type: ignore[import-untyped]

        return (PublishError, AMQPError, KombuError, OSError)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name=f"taskbridge-amqp-{self._name}", daemon=True
                )
                self._thread.start()

    async def ping(self) -> None:
        """Connect if needed and make one round trip to the broker."""
        await self._submit((), probe=True)

    async def publish(
        self, messages: Sequence[TaskMessage], on_withdrawn: Callable[[], None] | None = None
    ) -> list[str]:
        """Publish `messages`; return once the broker confirmed all of them (nothing is
        skipped here: idempotency keys are taken in the result backend's Redis beforehand).
        When the caller gives up (cancelled) before the batch was written, it is withdrawn,
        and `on_withdrawn()` is called: it was not sent, and never will be."""
        await self._submit(messages, on_withdrawn=on_withdrawn)
        return []

    async def _submit(
        self,
        messages: Sequence[TaskMessage],
        probe: bool = False,
        on_withdrawn: Callable[[], None] | None = None,
    ) -> None:
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        deadline = dispatch_deadline()
        if deadline is None:
            deadline = time.time() + self._timeout
        job = _Job(messages, loop, future, probe, deadline)
        self._jobs.put(job)
        try:
            await future
        except asyncio.CancelledError:
            # Given up on (dispatch timeout): if the thread has not written it yet, it never
            # will, so the 503 the request gets means "not sent". Once written, its bytes may
            # be on their way (see the README's guarantee table).
            with self._claim:
                withdrawn = job.state in ("waiting", "taken")
                if withdrawn:
                    job.state = "withdrawn"
            if withdrawn and on_withdrawn is not None:
                on_withdrawn()
            raise

    async def close(self) -> None:
        """Stop the thread after the batches already handed to it, and disconnect."""
        thread = self._thread
        if thread is None:
            return
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, self._timeout * 2)
        self._thread = None

    # -- the publisher thread ---------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                jobs, stop = [first], False
                with contextlib.suppress(queue.Empty):
                    while True:  # group commit: take every batch already waiting
                        job = self._jobs.get_nowait()
                        if job is None:
                            stop = True
                            break
                        jobs.append(job)
                with self._claim:
                    jobs = [job for job in jobs if job.state == "waiting"]
                    for job in jobs:
                        job.state = "taken"
                error: BaseException | None = None
                try:
                    if jobs:
                        self._send(jobs)
                except BaseException as exc:
                    error = exc
                by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
                for job in jobs:
                    by_loop.setdefault(job.loop, []).append(job.future)
                for loop, futures in by_loop.items():  # one wake-up per loop, not per batch
                    with contextlib.suppress(RuntimeError):  # that loop is closed already
                        loop.call_soon_threadsafe(_settle, futures, error)
                if stop:
                    return
        finally:
            self._disconnect()

    def _send(self, jobs: list[_Job]) -> None:
        # A cached connection may have died while idle (broker restart, idle timeout): found
        # before writing, it is replaced. A batch is written once: when the link fails after
        # its bytes left, it is reported failed, not sent again (it may have arrived; sending
        # it again could run it twice).
        if self._channel is not None and self._stale():
            self._disconnect()
        self._written = False
        try:
            self._send_once(jobs)
        except self.errors:
            self._disconnect()
            if self._written:
                raise
            self._send_once(jobs)

    def _deadline(self, jobs: list[_Job]) -> float | None:
        """The earliest deadline of the batches whose requests still wait (None: all gave up).
        Connecting serves the most pressed request first; once it gives up (withdrawing its
        batch), the next one's deadline applies."""
        with self._claim:
            return min((job.deadline for job in jobs if job.state == "taken"), default=None)

    def _stale(self) -> bool:
        """The cached connection's socket was closed by the peer (EOF or reset pending)."""
        try:
            sock = self._connection.connection.transport.sock
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except ValueError:  # a TLS socket cannot peek: rely on the write failing
            return False
        except (OSError, AttributeError):
            return True

    def _establish(self, connection: Any, jobs: list[_Job]) -> None:
        """Connect `connection` to its current host or, failing that, to the next ones of its
        failover list (kombu's `maybe_switch_next`, in the order of its failover strategy):
        each host once, sharing what is left until the `jobs`' deadline (see `_deadline`)
        between the hosts left to try (each attempt also bounded by the broker connection
        timeout). No retry loop beyond that: the caller's dispatch timeout is short, and a down
        broker must be reported, not waited for."""
        hosts = max(1, len(connection.alt or ()))
        errors = tuple(connection.recoverable_connection_errors)
        for attempt in range(hosts):
            deadline = self._deadline(jobs)
            if deadline is None:
                raise PublishError("every request waiting for this connection gave up")
            if attempt:
                connection.maybe_switch_next()
            left = (deadline - time.time()) / (hosts - attempt)
            # (a switch resets it to the configured one)
            connection.connect_timeout = max(0.05, min(self._timeout, left))
            try:
                connection.ensure_connection(max_retries=0, reraise_as_library_errors=False)
            except errors as exc:
                if attempt + 1 == hosts:
                    raise
                logger.warning(
                    "backend %r: the RabbitMQ broker at %s did not take a connection (%s: %s); "
                    "trying the next one of its failover list",
                    self._name,
                    redact_url(connection.as_uri()),
                    type(exc).__name__,
                    exc,
                )
                continue
            if attempt:
                logger.warning(
                    "backend %r: publishing to the RabbitMQ broker at %s (failover)",
                    self._name,
                    redact_url(connection.as_uri()),
                )
            return

    def _ensure_channel(self, jobs: list[_Job]) -> Any:
        if self._channel is None:
            if self._connection is None:
                self._connection = self._connect()
            connection = self._connection
            try:
                self._establish(connection, jobs)
                channel = connection.channel()
                confirms = _Confirms()
                channel.events["basic_ack"].add(confirms.on_ack)
                channel.events["basic_nack"].add(confirms.on_nack)
                channel.events["basic_return"].add(confirms.on_return)
                if self._confirm:
                    channel.confirm_select()
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.close()
                raise
            self._channel, self._confirms = channel, confirms
            self._declared.clear()
            self._delayed_ready.clear()
        return self._channel

    def _send_once(self, jobs: list[_Job]) -> None:
        reused = self._channel is not None
        channel = self._ensure_channel(jobs)
        every = [m for job in jobs for m in job.messages]
        if not every:
            if reused and any(job.probe for job in jobs):
                # a round trip with no effect: amq.direct always exists
                channel.exchange_declare("amq.direct", "direct", durable=True, passive=True)
            return
        for name in dict.fromkeys(m.queue for m in every):
            if name not in self._declared:
                # Publishing to a queue that does not exist drops the message: declare it
                # first, exactly as Celery would, so a worker started later declares the same.
                self._declare(channel, name)
                self._declared.add(name)
        if self._declare_delayed is not None:
            for name in dict.fromkeys(m.queue for m in every if m.exchange):
                if name not in self._delayed_ready:
                    # A delayed message that reaches no queue after its delay is dropped:
                    # make sure the delayed-delivery exchanges exist and lead to this queue.
                    self._declare_delayed(self._connection, name)
                    self._delayed_ready.add(name)
        confirms = self._confirms
        confirms.nacked, confirms.returned = 0, []
        amqp_connection = self._connection.connection
        frames = [
            b"".join(
                publish_frames(m, channel.channel_id, amqp_connection.frame_max)
                for m in job.messages
            )
            for job in jobs
        ]
        with self._claim:  # the last moment a request that gave up can withdraw its batch
            sending = [job.state == "taken" for job in jobs]
            for job, send in zip(jobs, sending, strict=True):
                if send:
                    job.state = "written"
        count = sum(len(job.messages) for job, send in zip(jobs, sending, strict=True) if send)
        if not count:
            return
        data = b"".join(f for f, send in zip(frames, sending, strict=True) if send)
        # Count the tags before writing: acks may arrive as soon as the broker reads.
        confirms.outstanding.update(range(confirms.next_tag, confirms.next_tag + count))
        confirms.next_tag += count
        self._written = True  # from here on, the bytes may reach the broker
        amqp_connection.transport.write(data)  # the whole group in one write
        if not self._confirm:
            confirms.outstanding.clear()
            return
        wait_until = time.monotonic() + self._timeout
        while confirms.outstanding:
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"RabbitMQ confirmed {count - len(confirms.outstanding)} of "
                    f"{count} message(s) within {self._timeout}s (is it blocking "
                    "publishers, e.g. on a memory or disk alarm?)"
                )
            self._connection.drain_events(timeout=remaining)
        if confirms.returned:
            self._declared.difference_update(confirms.returned)
            self._delayed_ready.clear()  # a delayed message returned: its route is gone
            raise PublishError(
                f"RabbitMQ had no queue for {len(confirms.returned)} message(s) "
                f"(queues {', '.join(sorted(set(confirms.returned)))} deleted?)"
            )
        if confirms.nacked:
            raise PublishError(f"RabbitMQ refused {confirms.nacked} message(s) (nack)")

    def _disconnect(self) -> None:
        """Close the connection; the kombu Connection is kept, and with it its place in the
        failover list."""
        connection, self._channel = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
