"""Identifiers and the error/close-code table."""

from __future__ import annotations

from imfast.protocol.codes import CLOSE_CODES, ERRORS, CloseCode, is_reconnect_code, markdown_tables
from imfast.protocol.ids import group_conv, is_valid_id, parse_conv, private_conv, seq_key


def test_private_conv_is_symmetric_and_maps_to_contract_redis_key() -> None:
    assert private_conv("bob", "alice") == private_conv("alice", "bob") == "p:alice:bob"
    assert seq_key("p:alice:bob") == "seq:private:alice:bob"
    assert seq_key(group_conv("team")) == "seq:group:team"


def test_ids() -> None:
    assert is_valid_id("alice.smith@corp-1_x")
    for bad in ("", "a:b", "a/b", "x" * 65, None, 5):
        assert not is_valid_id(bad)
    assert parse_conv("p:b:a") is None and parse_conv("p:a:b") == ("p", ("a", "b"))
    assert parse_conv("g:team") == ("g", ("team",)) and parse_conv("x:y") is None


def test_every_close_code_is_documented_and_classified() -> None:
    assert set(CLOSE_CODES) == set(CloseCode)
    for code, (kind, meaning) in CLOSE_CODES.items():
        if 4000 <= code < 4500:
            assert kind == "reconnect" and is_reconnect_code(code)
        if 4500 <= code < 5000:
            assert kind == "terminal" and not is_reconnect_code(code)
        assert meaning
    table = markdown_tables()
    for name in ERRORS:
        assert f"`{name}`" in table
