"""Error codes and close codes: the one table clients and docs rely on.

Every failure the gateway reports is either an *error frame* (the connection
stays open) carrying one of :data:`ERRORS`' codes, or a *close code* from
:data:`CLOSE_CODES`.  Close codes 4000-4499 mean "reconnect" (with backoff);
4500-4999 mean "terminal": reconnecting with the same credentials or input
will fail the same way.  ``docs/protocol.md`` prints both tables from here
(``python -m imfast.protocol.codes``), so the docs cannot drift.
"""

from __future__ import annotations

import enum

__all__ = [
    "CLOSE_CODES",
    "ERRORS",
    "CloseCode",
    "ImfastError",
    "ProtocolError",
    "is_reconnect_code",
    "markdown_tables",
]


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # 4000-4499: reconnect (after a backoff), nothing is lost.
    RECONNECT = 4000
    DRAINING = 4001
    SLOW_CONSUMER = 4002
    HEARTBEAT_TIMEOUT = 4003
    OVER_CAPACITY = 4004
    REPLACED = 4005
    TOKEN_EXPIRED = 4006
    # 4500-4999: terminal; fix the cause before reconnecting.
    AUTH_FAILED = 4500
    AUTH_TIMEOUT = 4501
    TOO_MANY_ERRORS = 4502
    RATE_LIMITED = 4503
    UNSUPPORTED_PROTOCOL = 4504
    TOO_MANY_DEVICES = 4505


CLOSE_CODES: dict[CloseCode, tuple[str, str]] = {
    CloseCode.NORMAL: ("either", "normal closure"),
    CloseCode.GOING_AWAY: ("reconnect", "server shutting down"),
    CloseCode.PROTOCOL_ERROR: ("terminal", "WebSocket protocol violation (RFC 6455)"),
    CloseCode.INVALID_PAYLOAD: ("terminal", "text message is not valid UTF-8"),
    CloseCode.POLICY_VIOLATION: ("terminal", "policy violation (e.g. ping flood)"),
    CloseCode.TOO_BIG: ("terminal", "message larger than MAX_FRAME_BYTES"),
    CloseCode.INTERNAL_ERROR: ("reconnect", "unexpected server error"),
    CloseCode.TRY_AGAIN_LATER: ("reconnect", "server overloaded"),
    CloseCode.RECONNECT: ("reconnect", "reconnect now (generic)"),
    CloseCode.DRAINING: ("reconnect", "gateway draining: reconnect (to another gateway)"),
    CloseCode.SLOW_CONSUMER: ("reconnect", "client read too slowly; pending messages kept"),
    CloseCode.HEARTBEAT_TIMEOUT: ("reconnect", "no traffic within HEARTBEAT_TIMEOUT"),
    CloseCode.OVER_CAPACITY: ("reconnect", "gateway full: retry elsewhere/later"),
    CloseCode.REPLACED: ("reconnect", ("same user+device connected again elsewhere; reconnecting "
                                       "takes the session back (and closes the other with "
                                       "4005): the SDK and the browser page stop instead")),
    CloseCode.TOKEN_EXPIRED: ("reconnect", "token expired: reconnect with a fresh token"),
    CloseCode.AUTH_FAILED: ("terminal", "token missing, malformed, forged or wrong aud/iss"),
    CloseCode.AUTH_TIMEOUT: ("terminal", "no auth frame within AUTH_TIMEOUT"),
    CloseCode.TOO_MANY_ERRORS: ("terminal", "too many bad frames (MAX_PROTOCOL_ERRORS)"),
    CloseCode.RATE_LIMITED: ("terminal", "kept sending past the rate limit"),
    CloseCode.UNSUPPORTED_PROTOCOL: ("terminal", "unsupported protocol version"),
    CloseCode.TOO_MANY_DEVICES: ("terminal", ("the user already has MAX_DEVICES_PER_USER other "
                                              "devices connected here: close one first")),
}


def is_reconnect_code(code: int) -> bool:
    """True when a client should reconnect (with backoff) after this close code."""
    if 4000 <= code < 4500:
        return True
    if 4500 <= code < 5000:
        return False
    return code in (1001, 1006, 1011, 1012, 1013, 1014)


#: error code -> meaning; error frames carry one of these in ``code``.
ERRORS: dict[str, str] = {
    "bad_json": "the frame is not a JSON object",
    "bad_request": "a field is missing, of the wrong type or out of range (see `field`)",
    "unknown_type": "`type` is not a known frame type",
    "too_large": "the message body exceeds MAX_BODY_BYTES",
    "not_authenticated": "authenticate first (`auth` frame or `?token=`)",
    "already_authenticated": "the connection is already authenticated",
    "auth_failed": "token rejected (also sent just before close 4500)",
    "not_found": "no such user, group or message (also for things you may not see)",
    "forbidden": "not a member of that group, or not allowed to do this",
    "rate_limited": "slow down; repeated abuse closes the connection",
    "too_many_devices": "too many devices of this user connected (also sent just before "
                        "close 4505)",
    "feature_disabled": "this feature is switched off on this server",
    "unavailable": "a backend is unavailable; retry the same frame later (safe: deduplicated)",
    "recall_window_passed": "the message is too old to recall",
    "internal": "unexpected server error; retry",
}


class ImfastError(Exception):
    """Base of every error the protocol reports to a client as an error frame."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        assert self.code in ERRORS, self.code


class ProtocolError(ImfastError):
    """The client sent something malformed (bad JSON, wrong field, unknown type)."""

    code = "bad_request"


def markdown_tables() -> str:
    """The close-code and error-code tables in Markdown (for docs/protocol.md)."""
    lines = ["| close code | name | client should | meaning |", "|---|---|---|---|"]
    for code, (kind, meaning) in CLOSE_CODES.items():
        lines.append(f"| {int(code)} | {code.name} | {kind} | {meaning} |")
    lines += ["", "| error code | meaning |", "|---|---|"]
    for name, meaning in ERRORS.items():
        lines.append(f"| `{name}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(markdown_tables())
