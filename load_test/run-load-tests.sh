#!/usr/bin/env bash
# imfast load tests: run-load-tests.sh MODE [--target URL] [--duration S] [--connections N] [--rate R]
#
#   MODE: quick | full | soak | stress | capacity | reconnect-storm
#   (`run-load-tests.sh --help` lists every option; docs/performance.md explains them.)
#
# Without --target it starts an embedded node (`imfast serve` on a free loopback port)
# and stops it at the end. Prints progress every second and a verdict per SLO line, writes
# load_test/reports/<mode>-<timestamp>/report.html (+ result.json), exits non-zero on a miss.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

# $PYTHON if set, else the repo's virtualenv (`make install` creates it), else the
# active virtualenv, else python3.
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    py="$repo/.venv/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    py="$VIRTUAL_ENV/bin/python"
else
    py="$(command -v python3)"
fi

if ! "$py" -c 'import imfast, picows, uvloop, orjson' 2>/dev/null; then
    echo "run-load-tests: $py cannot import imfast/picows/uvloop/orjson;" \
         "run \`make install\` in $repo first (or set PYTHON=...)" >&2
    exit 2
fi

# Many sockets: use the hard limit of open files (the generator splits into processes
# of at most 15,000 sockets each).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cd "$repo"
exec "$py" "$here/runner.py" "$@"
