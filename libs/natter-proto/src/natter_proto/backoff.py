"""Exponential backoff with jitter; the caller owns the clock and the randomness."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of initial, 2x, 4x ... capped at maximum, each spread by +-jitter."""

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        base = float(min(self.maximum, self.initial * (2.0**self._attempt)))
        self._attempt += 1
        if self.jitter:
            base *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return base

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt
