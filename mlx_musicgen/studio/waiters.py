"""Listeners that wait for a change without holding a thread: each awaits an event on its own event loop, and
whoever makes the change (the worker thread) wakes it with call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Callable


class Waiters:
    """Async waiters by key (a job's id), woken from any thread."""

    def __init__(self):
        self.waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.lock = threading.Lock()  # never held across an await or I/O

    async def wait(self, key: str, changed: Callable[[], bool], timeout: float) -> None:
        """Return once `changed()` holds after a wake for `key` (or all), or after `timeout` seconds."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self.lock:
            self.waiting.setdefault(key, set()).add(waiter)
        try:
            # checked after registering: a change made in between has woken the waiter, so none is missed
            if not changed():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), timeout)
        finally:
            with self.lock:
                waiting = self.waiting.get(key)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self.waiting[key]

    def wake(self, key: str | None = None) -> None:
        """Wake the waiters of `key` (everyone's when None), from any thread."""
        with self.lock:
            waiters = [w for k, waiting in self.waiting.items() if key in (None, k) for w in waiting]
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # its loop has closed: the server is gone
                loop.call_soon_threadsafe(event.set)
