"""Which key owns which name at a broker: the first key to register a name binds it.

A binding outlives the agent's registration: a name whose agent went offline stays
reserved for its key for ``grace`` seconds after its last registration, so an impostor
cannot take it while the real agent is away (or while a restarted broker waits for it to
come back: a lone broker keeps bindings on disk, a fleet in Redis). Names listed in a
names file (``--names``) are bound before anyone registers, and for good.

Pure: wall-clock time is passed in; the broker persists what ``claim`` reports changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import valid_name
from .identity import same_fingerprint, valid_fingerprint
from .pairfile import pairs

NAME_GRACE = 90 * 24 * 3600.0  # seconds a released name stays reserved for its key
REFRESH_AFTER = 24 * 3600.0  # a binding's time is rewritten at most this often


class NamesFileError(ValueError):
    pass


def parse_names_file(text: str) -> dict[str, str]:
    """``NAME FINGERPRINT`` per line (``#`` starts a comment) -> {name: fingerprint}."""
    names: dict[str, str] = {}
    try:
        lines = list(pairs(text, "names file", "NAME FINGERPRINT"))
    except ValueError as exc:
        raise NamesFileError(str(exc)) from None
    for number, name, raw_print in lines:
        print_ = raw_print.lower()
        if not valid_name(name) or not valid_fingerprint(print_):
            raise NamesFileError(f"line {number}: expected 'NAME FINGERPRINT' (see 'natter id')")
        if names.get(name, print_) != print_:
            raise NamesFileError(f"line {number}: {name} is bound to two keys")
        names[name] = print_
    return names


@dataclass(frozen=True)
class Binding:
    name: str
    fingerprint: str
    last_registered: float  # wall-clock seconds
    fixed: bool = False  # from the names file: never expires


class NameBook:
    def __init__(self, grace: float = NAME_GRACE, fixed: dict[str, str] | None = None) -> None:
        self.grace = grace
        self._bindings: dict[str, Binding] = {
            name: Binding(name, print_, 0.0, fixed=True) for name, print_ in (fixed or {}).items()
        }

    def __len__(self) -> int:
        return len(self._bindings)

    def load(self, bindings: list[Binding], now: float) -> None:
        """Bindings kept from before a restart; the names file wins over them."""
        for binding in bindings:
            current = self._bindings.get(binding.name)
            if (current is None or not current.fixed) and not self._lapsed(binding, now):
                self._bindings[binding.name] = binding

    def owner(self, name: str, now: float) -> Binding | None:
        binding = self._bindings.get(name)
        if binding is None or self._lapsed(binding, now):
            return None
        return binding

    def claim(self, name: str, fingerprint: str, now: float) -> tuple[Binding | None, Binding | None]:
        """A registration of name by the key with this fingerprint: (the binding that refuses
        it, None) if another key holds the name, else (None, the binding to write, if it
        changed enough to be worth writing)."""
        held = self.owner(name, now)
        if held is not None and not same_fingerprint(held.fingerprint, fingerprint):
            return held, None
        if held is not None and (held.fixed or now - held.last_registered < REFRESH_AFTER):
            return None, None
        binding = Binding(name, fingerprint, now)
        self._bindings[name] = binding
        return None, binding

    def expire(self, now: float) -> list[str]:
        """Forget bindings whose grace has passed (the table is bounded by it)."""
        gone = [name for name, b in self._bindings.items() if self._lapsed(b, now)]
        for name in gone:
            del self._bindings[name]
        return gone

    def _lapsed(self, binding: Binding, now: float) -> bool:
        return not binding.fixed and now - binding.last_registered > self.grace
