"""Structured logging: one JSON object per line by default, text as an option.

Messages are written as words followed by ``key=value`` pairs
("duplicate message detected dedup_key=... user_id=alice"), so an operator's
``grep "user_id=alice"`` finds them in either format; in JSON the pairs are
also lifted into fields (``"user_id": "alice"``) for log search tools.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

__all__ = ["JsonFormatter", "setup_logging"]

_PAIR = re.compile(r"\b([a-z_]+)=(\S+)")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", <key=value pairs>, "exc"}`` per line."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": msg,
        }
        for key, value in _PAIR.findall(msg):
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(fmt: str, level: str, role: str) -> None:
    """Send logs to stderr in ``fmt`` ("json" or "text") at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("picows").setLevel(max(logging.WARNING, logging.getLevelName(level)))
