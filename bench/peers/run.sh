#!/usr/bin/env bash
# imfast next to minimal relays (websockets, aiohttp, Node.js ws) under the same load.
# Usage: bash bench/peers/run.sh [--servers imfast,websockets,aiohttp,node-ws] [--rate 1000] ...
# (`bash bench/peers/run.sh --help` lists the options; docs/performance.md shows results.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    py="$repo/.venv/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    py="$VIRTUAL_ENV/bin/python"
else
    py="$(command -v python3)"
fi
missing="$("$py" - <<'PY'
import importlib.util
print(" ".join(m for m in ("imfast", "picows", "uvloop", "orjson", "websockets", "aiohttp")
               if importlib.util.find_spec(m) is None))
PY
)"
if [[ -n "$missing" ]]; then
    echo "peers: $py lacks: $missing (pip install websockets aiohttp; make install for imfast)" >&2
    exit 2
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$repo"
exec "$py" "$here/run.py" "$@"
