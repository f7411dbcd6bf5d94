"""Waiters queued per owner and served in turn (round robin).

A tunnel has a limited number of stream slots. When they run short, connections wait; if
they waited in one line, a forward with thousands of idle clients would sit in front of
every other forward to the same peer. Here each owner (a forward) has its own line and
the lines take turns, so one owner's queue cannot starve another's.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class FairQueue(Generic[Item]):
    def __init__(self) -> None:
        self._lines: OrderedDict[Hashable, deque[Item]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, owner: Hashable, item: Item) -> None:
        self._lines.setdefault(owner, deque()).append(item)
        self._size += 1

    def pop(self) -> Item | None:
        """The next owner's oldest item; that owner then goes to the back."""
        if not self._lines:
            return None
        owner, line = next(iter(self._lines.items()))
        item = line.popleft()
        self._size -= 1
        if line:
            self._lines.move_to_end(owner)
        else:
            del self._lines[owner]
        return item

    def remove(self, owner: Hashable, item: Item) -> bool:
        """Take out an item that gave up waiting; False if it was not queued."""
        line = self._lines.get(owner)
        if line is None or item not in line:
            return False
        line.remove(item)
        self._size -= 1
        if not line:
            del self._lines[owner]
        return True

    def waiting(self, owner: Hashable) -> int:
        line = self._lines.get(owner)
        return len(line) if line is not None else 0
