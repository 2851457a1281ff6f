"""Where a client keeps the last seq it processed in each conversation.

The server already resumes a device from its acknowledged cursor; this local
record lets the client drop an entry it processed but had not acknowledged
yet when the connection (or the process) ended.  Keep one store per
user+device: the seqs are that device's view.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

__all__ = ["CursorStore", "JsonFileCursorStore", "MemoryCursorStore"]


class CursorStore(Protocol):
    """conv -> last processed seq.  ``save`` receives the whole mapping."""

    def load(self) -> dict[str, int]:
        """The saved mapping (empty when there is none)."""
        ...

    def save(self, seqs: dict[str, int]) -> None:
        """Replace the saved mapping; called at most a few times a second."""
        ...


class MemoryCursorStore:
    """Keeps the mapping in memory (the default): lost when the process ends."""

    def __init__(self) -> None:
        self._seqs: dict[str, int] = {}

    def load(self) -> dict[str, int]:
        return dict(self._seqs)

    def save(self, seqs: dict[str, int]) -> None:
        self._seqs = dict(seqs)


class JsonFileCursorStore:
    """Keeps the mapping in a JSON file, replaced atomically (write + rename) on save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, int]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(f"{self.path}: not a JSON cursor file ({exc})") from None
        return {str(k): int(v) for k, v in raw.items()}

    def save(self, seqs: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(seqs, fh, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
