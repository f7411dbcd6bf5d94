"""Group work that arrives while the previous batch is in flight, so that under load one
Redis round trip answers many frames (and at light load a frame waits for nobody)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Batcher(Generic[Item]):
    def __init__(
        self, handle: Callable[[list[Item]], Awaitable[None]], *, workers: int = 2, max_batch: int = 512
    ) -> None:
        self._handle = handle
        self._items: list[Item] = []
        self._wake = asyncio.Event()
        self._max_batch = max_batch
        self._tasks = [asyncio.get_running_loop().create_task(self._work()) for _ in range(workers)]

    def submit(self, item: Item) -> None:
        self._items.append(item)
        self._wake.set()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            batch, self._items = self._items[: self._max_batch], self._items[self._max_batch :]
            if not self._items:
                self._wake.clear()
            if batch:
                await self._handle(batch)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
