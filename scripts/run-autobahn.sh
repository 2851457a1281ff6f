#!/bin/bash
# Runs the Autobahn|Testsuite fuzzing client against the conformance echo
# endpoint of a fresh node; exits with the suite's status (1 if a case FAILED).
#
#   usage: scripts/run-autobahn.sh [REPORT_DIR]     (default: ./autobahn-report)
#
# Needs root (the suite runs from a Debian 11 chroot that autobahn.sh builds on
# first use, ~5 minutes). The node runs with IMFAST_CONFORMANCE_ECHO=1 on a free
# port of 127.0.0.1 and a throw-away data dir; it is stopped afterwards.
# Environment:
#   AUTOBAHN_SH            the suite runner (default: ../shared/tools/autobahn.sh
#                          next to the repository, else /work/shared/tools/autobahn.sh)
#   IMFAST                 the imfast command (default: imfast on PATH, else python -m imfast)
#   MAX_FRAME_BYTES        passed to the node (not needed: in conformance mode /_echo
#                          takes 16 MiB frames whatever it says)
#   AUTOBAHN_COMPRESSION=1 also run cases 12.* and 13.* (permessage-deflate: not offered)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
report=$(realpath -m "${1:-$PWD/autobahn-report}")

runner=${AUTOBAHN_SH:-}
if [ -z "$runner" ]; then
  for candidate in "$repo/../shared/tools/autobahn.sh" /work/shared/tools/autobahn.sh; do
    if [ -f "$candidate" ]; then runner=$candidate; break; fi
  done
fi
[ -n "$runner" ] && [ -f "$runner" ] || { echo "run-autobahn: autobahn.sh not found" >&2; exit 2; }

if [ -n "${IMFAST:-}" ]; then
  read -r -a imfast <<<"$IMFAST"
elif command -v imfast >/dev/null; then
  imfast=(imfast)
else
  imfast=(python3 -m imfast)
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
data=$(mktemp -d)
log="$data/node.log"
node_pid=
cleanup() {
  if [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
    kill -TERM "$node_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$node_pid" 2>/dev/null || true
  fi
  rm -rf "$data"
}
trap cleanup EXIT

IMFAST_CONFORMANCE_ECHO=1 "${imfast[@]}" serve --host 127.0.0.1 --port "$port" \
  --data-dir "$data" --log-format text >"$log" 2>&1 &
node_pid=$!

# Ready when /_echo exists: a plain GET is answered 400 (no upgrade), not 404.
ready=0
for _ in $(seq 100); do
  kill -0 "$node_pid" 2>/dev/null || break
  status=$(python3 - "$port" <<'PY' 2>/dev/null || true
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/_echo", timeout=1)
except urllib.error.HTTPError as exc:
    print(exc.code)
PY
)
  if [ "$status" = 400 ]; then ready=1; break; fi
  sleep 0.1
done
if [ "$ready" != 1 ]; then
  echo "run-autobahn: the node did not serve /_echo on port $port:" >&2
  tail -20 "$log" >&2
  exit 2
fi

echo "run-autobahn: node pid $node_pid on port $port; report in $report" >&2
status=0
bash "$runner" "ws://127.0.0.1:$port/_echo" imfast "$report" || status=$?
exit "$status"
