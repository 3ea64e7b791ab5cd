"""One UNet pass at a time, each as full as the queue allows. Plain asyncio, no Ray.

Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request, even while the
engine is still busy with the previous one; with one pass at a time, the batches formed during a pass would wait
frozen at whatever arrived in those few milliseconds (measured: 3-4 images per pass at 16 concurrent clients,
where 8 fit). ``PassQueue`` takes every batch as it is formed and merges what is waiting when the engine frees up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class PassQueue(Generic[T, R]):
    """``await submit(items)`` -> one result per item; items run in arrival order, in passes of at most
    ``max_images`` (by ``size(item)``), one pass at a time through ``run``. Items for which ``skip(item)`` is
    true when their pass is formed (their client left) get ``skipped(item)`` instead of running.

    Priority: items for which ``low(item)`` is true (batch requests, serving/batches) go into a pass only after
    every waiting interactive item that fits, into the room those leave, and at most ``max_low`` images of them per
    pass (None: all the room); a pass with no interactive item takes at least one low item, so batches always
    move. An interactive request therefore never waits behind a batch request except for the one pass running
    when it arrives."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        size: Callable[[T], int],
        max_images: int,
        skip: Callable[[T], bool] = lambda item: False,
        skipped: Callable[[T], R] | None = None,
        low: Callable[[T], bool] = lambda item: False,
        max_low: int | None = None,
    ):
        self.run, self.size, self.max_images, self.skip, self.skipped = run, size, max_images, skip, skipped
        self.low, self.max_low = low, max_low
        self._waiting: list[tuple[T, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, items: list[T]) -> list[R]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._waiting.extend(zip(items, futures))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return list(await asyncio.gather(*futures))

    def _next_pass(self) -> list[tuple[T, asyncio.Future]]:
        taken: list[tuple[T, asyncio.Future]] = []
        images = low_images = 0
        for low in (False, True):  # interactive items first, in arrival order; then low ones into the room left
            kept, full = [], False
            for item, future in self._waiting:
                if full or self.low(item) != low:
                    kept.append((item, future))
                    continue
                if future.done():  # cancelled by its caller
                    continue
                if self.skip(item):
                    future.set_result(self.skipped(item) if self.skipped else None)
                    continue
                size = self.size(item)
                fits = images + size <= self.max_images
                if low:
                    fits = fits and (self.max_low is None or low_images + size <= self.max_low)
                if taken and not fits:
                    full = True  # later items wait too: arrival order within a priority
                    kept.append((item, future))
                    continue
                taken.append((item, future))
                images += size
                low_images += size if low else 0
            self._waiting = kept
        return taken

    async def _work(self) -> None:
        while self._waiting:
            taken = self._next_pass()
            if not taken:
                continue
            try:
                results = await self.run([item for item, _ in taken])
            except Exception as exc:  # noqa: BLE001 - the pass failed: every member gets the error
                results = [exc] * len(taken)
            for (_, future), result in zip(taken, results):
                if not future.done():
                    future.set_result(result)
