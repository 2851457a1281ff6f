"""The key filters behind the SQLite store's skipped reads: never a false "absent"."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imfast.backends.keyfilter import KeyFilter, KeyFilters

_keys = st.one_of(st.text(max_size=40), st.tuples(st.text(max_size=10), st.text(max_size=10)),
                  st.integers())


@settings(max_examples=200)
@given(st.lists(_keys, max_size=300))
def test_every_added_key_is_reported_maybe_present(keys: list[object]) -> None:
    one, grown = KeyFilter(capacity=8), KeyFilters(capacity=8)  # both overfilled on purpose
    batched = KeyFilters(capacity=8)
    for key in keys:
        one.add(key)
        grown.add(key)
    batched.add_all(keys)
    assert all(key in one for key in keys)
    assert all(key in grown for key in keys)
    assert all(key in batched for key in keys)
    assert batched.count == grown.count == len(keys)
    assert len(batched._filters) == len(grown._filters)  # grows exactly as one by one


def test_absent_keys_are_mostly_reported_absent_at_capacity() -> None:
    f = KeyFilter(capacity=20_000)
    for i in range(20_000):
        f.add(f"user{i}:cmid-{i}")
    false_maybe = sum(f"other{i}:cmid-{i}" in f for i in range(20_000))
    assert false_maybe < 20_000 * 0.03  # ~0.5 % expected with 16 bits and 3 positions a key
    assert "anything" not in KeyFilter(capacity=10)


def test_a_growing_set_adds_larger_filters_and_keeps_precision() -> None:
    grown = KeyFilters(capacity=1_000)
    for i in range(10_000):
        grown.add(("u", f"d{i}", "conv"))
    assert len(grown._filters) == 4  # 1,000 + 2,000 + 4,000 + 8,000 keys of room
    assert grown.count == 10_000
    false_maybe = sum(("u", f"x{i}", "conv") in grown for i in range(10_000))
    assert false_maybe < 10_000 * 0.06  # four filters, each within its capacity


def test_absorb_answers_for_both_sets() -> None:
    live, scanned = KeyFilters(), KeyFilters()
    live.add("written-now")
    scanned.add("already-in-the-file")
    live.absorb(scanned)
    assert "written-now" in live and "already-in-the-file" in live
    assert live.count == 2 and live.nbytes == 2 * KeyFilter(1 << 16).nbytes
