"""The broker's optional token list: who may register at all.

One entry per line, ``NAME_OR_FINGERPRINT TOKEN``; ``#`` starts a comment. An agent is
admitted when an entry for its name or for its key's fingerprint carries its token.
"""

from __future__ import annotations

import hmac

from .frames import valid_name
from .identity import valid_fingerprint

MAX_FILE = 1 << 20
MAX_LINE = 512


class TokenListError(ValueError):
    pass


class TokenList:
    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = entries

    @classmethod
    def parse(cls, text: str) -> TokenList:
        if len(text) > MAX_FILE:
            raise TokenListError(f"token file larger than {MAX_FILE} bytes")
        entries: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if len(line) > MAX_LINE:
                raise TokenListError(f"line {number}: longer than {MAX_LINE} characters")
            parts = line.split()
            if len(parts) != 2:
                raise TokenListError(f"line {number}: expected 'NAME_OR_FINGERPRINT TOKEN'")
            who, token = parts
            if not (valid_name(who) or valid_fingerprint(who)):
                raise TokenListError(f"line {number}: {who!r} is neither a name nor a fingerprint")
            if not 0 < len(token) <= 128:
                raise TokenListError(f"line {number}: token must be 1-128 characters")
            entries[who] = token
        return cls(entries)

    def admits(self, name: str, fingerprint: str, token: str | None) -> bool:
        if token is None:
            return False
        for who in (name, fingerprint):
            expected = self.entries.get(who)
            if expected is not None and hmac.compare_digest(expected.encode(), token.encode()):
                return True
        return False
