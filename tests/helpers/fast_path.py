"""Recording what a router's in-call methods (send_now, ack_now, ...) returned."""

from __future__ import annotations

from typing import Any

RAISED = "raised"


def record_fast_path(router: Any, *methods: str) -> dict[str, list[object]]:
    """Wrap ``methods`` of ``router`` so each call's result is recorded (``RAISED`` for
    an exception, which still propagates); returns method name -> results in call order."""
    calls: dict[str, list[object]] = {name: [] for name in methods}
    for name in methods:
        original, seen = getattr(router, name), calls[name]

        def recording(*args: Any, _original: Any = original, _seen: list[object] = seen,
                      **kwargs: Any) -> Any:
            try:
                result = _original(*args, **kwargs)
            except Exception:
                _seen.append(RAISED)
                raise
            _seen.append(result)
            return result

        setattr(router, name, recording)
    return calls
