"""Envelope codec, pure-Python twin of ``imfast._core._codec``.

Guarantees (both twins, checked by the parity tests):

* :func:`decode_client_frame` returns a ``dict`` whose ``type`` is a known
  client frame type and whose known fields have the documented types and
  ranges, or raises :class:`~imfast.protocol.codes.ProtocolError` whose
  ``code``/``field`` say exactly what is wrong.  Unknown extra fields are
  ignored (forward compatibility).
* :func:`ws_text_frame` returns the bytes of one unmasked, final WebSocket
  text frame (RFC 6455 server framing) carrying ``payload`` unchanged.
* :func:`ws_frames` concatenates several such frames into one buffer: one
  ``write()`` for many messages, which is what coalescing needs.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from imfast.protocol.codes import ProtocolError

__all__ = [
    "CLIENT_TYPES",
    "decode_client_frame",
    "encode",
    "is_cmid",
    "is_request_id",
    "ws_frames",
    "ws_text_frame",
]

_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_CONV = re.compile(r"p:[A-Za-z0-9_.@-]{1,64}:[A-Za-z0-9_.@-]{1,64}|g:[A-Za-z0-9_.@-]{1,64}")
_MAX_SEQ = (1 << 53) - 1  # what JavaScript clients can hold exactly
_MAX_TOKEN = 8192
_MAX_CMID = 64
_MAX_LIST = 1000
_MAX_TEXT = 256

# Field kinds: id, conv, seq (int >= 0), limit (int 1..), cmid, token, body,
# text (short string), ids (list of ids), role, bool (true or false).
_R = True  # required
_O = False  # optional
CLIENT_TYPES: dict[str, dict[str, tuple[str, bool]]] = {
    "auth": {"token": ("token", _R)},
    "refresh": {"token": ("token", _R)},
    "ping": {},
    "send": {"cmid": ("cmid", _R), "to": ("id", _O), "group": ("id", _O), "body": ("body", _R)},
    "ack": {"conv": ("conv", _R), "seq": ("seq", _R)},
    "sync": {"conv": ("conv", _O), "after": ("seq", _O), "limit": ("limit", _O)},
    "history": {
        "conv": ("conv", _R), "before": ("seq", _O), "after": ("seq", _O), "limit": ("limit", _O)
    },
    "read": {"conv": ("conv", _R), "seq": ("seq", _R)},
    "typing": {"conv": ("conv", _R)},
    "recall": {"conv": ("conv", _R), "seq": ("seq", _R)},
    "presence": {"users": ("ids", _R)},
    "group_create": {
        "group": ("id", _R), "name": ("text", _O), "members": ("ids", _O), "open": ("bool", _O)
    },
    "group_join": {"group": ("id", _R)},
    "group_leave": {"group": ("id", _R)},
    "group_invite": {"group": ("id", _R), "users": ("ids", _R)},
    "group_remove": {"group": ("id", _R), "users": ("ids", _R)},
    "group_role": {"group": ("id", _R), "user": ("id", _R), "role": ("role", _R)},
    "group_members": {"group": ("id", _R)},
    "groups": {},
}
_ROLES = ("admin", "member")


def is_request_id(value: Any) -> bool:
    """A valid ``id``: a string of at most 64 characters or an integer 0..2^53-1."""
    return (type(value) is str and len(value) <= 64) or \
        (type(value) is int and 0 <= value <= _MAX_SEQ)


def is_cmid(value: Any) -> bool:
    """A valid ``cmid``: a printable string of 1-64 characters."""
    return isinstance(value, str) and 1 <= len(value) <= _MAX_CMID and value.isprintable()


def _check(kind: str, name: str, value: Any, max_body: int) -> None:
    if kind == "id":
        if not isinstance(value, str) or _ID.fullmatch(value) is None:
            raise ProtocolError(f"`{name}` must be an id of 1-64 characters [A-Za-z0-9_.@-]",
                                field=name)
    elif kind == "conv":
        if not isinstance(value, str) or _CONV.fullmatch(value) is None:
            raise ProtocolError(f"`{name}` must be a conversation id (p:<a>:<b> or g:<group>)",
                                field=name)
        if value[0] == "p":
            _, a, b = value.split(":")
            if a > b:
                raise ProtocolError(f"`{name}`: private conversation ids list users sorted",
                                    field=name)
    elif kind == "seq":
        if type(value) is not int or value < 0 or value > _MAX_SEQ:
            raise ProtocolError(f"`{name}` must be a whole number >= 0", field=name)
    elif kind == "limit":
        if type(value) is not int or value < 1 or value > _MAX_SEQ:
            raise ProtocolError(f"`{name}` must be a whole number >= 1", field=name)
    elif kind == "cmid":
        if not is_cmid(value):
            raise ProtocolError(f"`{name}` must be a printable string of 1-{_MAX_CMID} characters",
                                field=name)
    elif kind == "token":
        if not isinstance(value, str) or not 1 <= len(value) <= _MAX_TOKEN:
            raise ProtocolError(f"`{name}` must be a token string", field=name)
    elif kind == "body":
        if not isinstance(value, str):
            raise ProtocolError(f"`{name}` must be a string", field=name)
        if len(value) > max_body or len(value.encode("utf-8", "surrogatepass")) > max_body:
            raise ProtocolError(f"`{name}` is too large (max {max_body} bytes)",
                                field=name, code="too_large")
    elif kind == "text":
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise ProtocolError(f"`{name}` must be a string of at most {_MAX_TEXT} characters",
                                field=name)
    elif kind == "ids":
        if not isinstance(value, list) or len(value) > _MAX_LIST:
            raise ProtocolError(f"`{name}` must be a list of at most {_MAX_LIST} ids", field=name)
        for item in value:
            if not isinstance(item, str) or _ID.fullmatch(item) is None:
                raise ProtocolError(f"`{name}` must contain only ids", field=name)
    elif kind == "role":
        if value not in _ROLES:
            raise ProtocolError(f"`{name}` must be one of {', '.join(_ROLES)}", field=name)
    elif kind == "bool":
        if type(value) is not bool:
            raise ProtocolError(f"`{name}` must be true or false", field=name)
    else:  # pragma: no cover - table error
        raise AssertionError(kind)


def decode_client_frame(data: bytes | str, max_body: int) -> dict[str, Any]:
    """Parse and validate one client frame (see module docstring)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson says where and why ("depth limit exceeded: line 1 column 1026").
        raise ProtocolError(f"frame is not valid JSON: {exc}", code="bad_json") from None
    if type(obj) is not dict:
        raise ProtocolError("frame must be a JSON object", code="bad_json")
    ftype = obj.get("type")
    if type(ftype) is not str:
        raise ProtocolError("`type` is required and must be a string", field="type")
    spec = CLIENT_TYPES.get(ftype)
    if spec is None:
        raise ProtocolError(f"unknown frame type {ftype[:32]!r}", field="type",
                            code="unknown_type")
    rid = obj.get("id")
    if rid is not None and not is_request_id(rid):
        obj.pop("id")
        raise ProtocolError("`id` must be a string of at most 64 characters or an integer",
                            field="id")
    for name, (kind, required) in spec.items():
        value = obj.get(name)
        if value is None:
            if required:
                raise ProtocolError(f"`{name}` is required for {ftype}", field=name)
            continue
        _check(kind, name, value, max_body)
    # ``null`` counts as absent, as for every other field: {"to": null} alone is
    # not a destination (the router would assert on it).
    if ftype == "send" and ((obj.get("to") is None) == (obj.get("group") is None)):
        raise ProtocolError("send needs exactly one of `to` (user) or `group`", field="to")
    return obj


def encode(obj: Any) -> bytes:
    """Serialise a server frame to JSON bytes."""
    return orjson.dumps(obj)


def ws_text_frame(payload: bytes) -> bytes:
    """One final, unmasked WebSocket text frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126, n >> 8, n & 0xFF)) + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def ws_frames(payloads: list[bytes]) -> bytes:
    """Several text frames back to back, ready for a single write."""
    return b"".join([ws_text_frame(p) for p in payloads])
