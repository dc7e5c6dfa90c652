"""One engine, one generation at a time: requests wait in a bounded FIFO queue.

A worker thread takes jobs in arrival order and iterates `Engine.stream` for each, handing every
event to the job's asyncio queue on the server's event loop. A job that is cancelled (its client
went away) stops at the next token: the worker closes the engine's iterator, which ends the
generation. A full queue refuses new jobs (`QueueFull`; the server answers 503), so waiting is
bounded. Batched decoding would replace `_run_one` with a step over several jobs taken off the
same queue; nothing outside this module would change.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator

from qwen3next.request import Request, Result, Token

_END = object()  # after the last event of a job


class QueueFull(Exception):
    """As many requests wait as the queue holds."""


class Job:
    """One request's passage through the queue: its events arrive on the event loop it was made on."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop at the next token (or before starting, if still waiting)."""
        self._cancelled.set()

    async def events(self) -> AsyncIterator[Token | Result]:
        """The engine's Tokens, then its Result; an exception the engine raised is raised here."""
        while (event := await self._events.get()) is not _END:
            if isinstance(event, BaseException):
                raise event
            yield event

    def put(self, event: object) -> None:
        """Hand an event to the job's event loop (from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancel()


class Scheduler:
    """Runs jobs on `engine` one at a time; up to `max_waiting` (>= 1) wait behind the running one."""

    def __init__(self, engine, max_waiting: int):
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self.engine = engine
        self._queue: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._running: Job | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="qwen3next-generation", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Job:
        """Queue `request` (from the event loop); QueueFull when `max_waiting` jobs already wait."""
        job = Job(request, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return int(self._running is not None)

    def close(self) -> None:
        """Cancel the running job and those waiting, and stop the worker."""
        if self._running is not None:
            self._running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.cancel()
            job.put(_END)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                job.put(_END)
                continue
            self._running = job
            try:
                self._run_one(job)
            except Exception as error:  # reaches the request's handler, which answers it
                job.put(error)
            finally:
                self._running = None
                job.put(_END)

    def _run_one(self, job: Job) -> None:
        events = self.engine.stream(job.request)
        try:
            for event in events:
                if job.cancelled:
                    break
                job.put(event)
        finally:
            events.close()
