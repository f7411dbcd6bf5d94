"""The broker's optional token list: who may register at all.

One entry per line, ``NAME_OR_FINGERPRINT TOKEN``; ``#`` starts a comment. An agent is
admitted when an entry for its name or for its key's fingerprint carries its token.
"""

from __future__ import annotations

import hmac

from .frames import valid_name
from .identity import valid_fingerprint
from .pairfile import pairs


class TokenListError(ValueError):
    pass


class TokenList:
    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = entries

    @classmethod
    def parse(cls, text: str) -> TokenList:
        entries: dict[str, str] = {}
        try:
            lines = list(pairs(text, "token file", "NAME_OR_FINGERPRINT TOKEN"))
        except ValueError as exc:
            raise TokenListError(str(exc)) from None
        for number, who, token in lines:
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
