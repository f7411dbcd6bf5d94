"""Name bindings at a broker: first key wins, a released name stays its key's for the
grace period, the names file binds for good, and its parser refuses junk clearly."""

from __future__ import annotations

import pytest

from natter_proto.identity import Identity
from natter_proto.names import REFRESH_AFTER, Binding, NameBook, NamesFileError, parse_names_file

BOB, MALLORY = Identity.generate().fingerprint, Identity.generate().fingerprint


def test_the_first_key_binds_a_name_and_others_are_refused() -> None:
    book = NameBook(grace=100.0)
    held, changed = book.claim("bob", BOB, 0.0)
    assert held is None and changed == Binding("bob", BOB, 0.0)
    held, changed = book.claim("bob", MALLORY, 1.0)
    assert held is not None and held.fingerprint == BOB and changed is None
    assert book.claim("bob", BOB, 2.0) == (None, None)  # nothing new worth writing


def test_a_released_name_stays_reserved_for_the_grace_period_then_lapses() -> None:
    book = NameBook(grace=100.0)
    book.claim("bob", BOB, 0.0)
    assert book.claim("bob", MALLORY, 99.0)[0] is not None
    held, changed = book.claim("bob", MALLORY, 101.0)
    assert held is None and changed is not None and changed.fingerprint == MALLORY


def test_registrations_refresh_the_binding_at_most_daily() -> None:
    book = NameBook(grace=REFRESH_AFTER * 3)
    book.claim("bob", BOB, 0.0)
    assert book.claim("bob", BOB, REFRESH_AFTER - 1)[1] is None
    assert book.claim("bob", BOB, REFRESH_AFTER + 1)[1] == Binding("bob", BOB, REFRESH_AFTER + 1)
    assert book.claim("bob", MALLORY, REFRESH_AFTER * 3.5)[0] is not None  # kept alive by it


def test_loaded_bindings_survive_a_restart_and_the_names_file_wins() -> None:
    book = NameBook(grace=100.0, fixed={"bob": BOB})
    book.load(
        [Binding("bob", MALLORY, 50.0), Binding("carol", MALLORY, 50.0), Binding("old", BOB, 0.0)], 120.0
    )
    assert book.claim("bob", MALLORY, 120.0)[0] is not None
    assert book.claim("carol", BOB, 120.0)[0] is not None
    assert book.claim("old", MALLORY, 120.0)[0] is None  # lapsed before the restart
    assert book.claim("bob", MALLORY, 1e12)[0] is not None  # fixed: never lapses
    assert book.expire(1e12) == ["carol", "old"] and len(book) == 1


def test_names_file_parser() -> None:
    text = f"# reserved\nbob {BOB.upper()}  # ops\n\ncarol {MALLORY}\n"
    assert parse_names_file(text) == {"bob": BOB, "carol": MALLORY}
    for bad in ("bob", f"bob {BOB} extra", "bob nt1-short", f"no/slash {BOB}", f"bob {BOB}\nbob {MALLORY}"):
        with pytest.raises(NamesFileError, match="line"):
            parse_names_file(bad)
    with pytest.raises(NamesFileError, match="larger"):
        parse_names_file("#" * (2 << 20))
