#!/usr/bin/env bash
# Install what tests/browser needs:
#   * Debian's chromium + chromium-driver (apt-get; the tests drive /usr/bin/chromium),
#   * the Python package playwright into $PYTHON (used with Debian's chromium only:
#     never run `playwright install`, which downloads a browser build),
#   * wscat from npm, under $IMFAST_TEST_TOOLS (default ~/.cache/imfast/test-tools);
#     the tests look for it there (node_modules/.bin/wscat), then on $PATH.
#
# Guarantees:
#   * Idempotent: installs only what is missing; silent and fast when all is present.
#   * `apt-get update` runs at most once, and only if a Debian package is missing.
#   * Exit status 1 with a clear message if something cannot be installed.
#
# Usage: [PYTHON=/path/to/python] [IMFAST_TEST_TOOLS=DIR] scripts/install-browser-test-deps.sh
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TOOLS="${IMFAST_TEST_TOOLS:-${HOME:-/root}/.cache/imfast/test-tools}"
PLAYWRIGHT_SPEC="playwright>=1.40"
WSCAT_SPEC="wscat@6"

die() { echo "install-browser-test-deps: $*" >&2; exit 1; }

# Runs "$@" with all output captured; shows it only if the command fails.
quietly() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    (( rc == 0 )) || cat "$log" >&2
    rm -f "$log"
    return "$rc"
}

# Debian packages the tests need, each with a file that proves it is there.
missing_debs() {
    [[ -x /usr/bin/chromium ]] || echo chromium
    [[ -x /usr/bin/chromedriver ]] || echo chromium-driver
    command -v npm >/dev/null 2>&1 || echo "nodejs npm"
}

install_debs() {
    local missing
    missing=$(missing_debs | xargs)
    [[ -z "$missing" ]] && return 0
    [[ "$(id -u)" == 0 ]] || die "missing $missing; re-run as root (e.g. sudo $0)"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -qq || die "apt-get update failed"
    # shellcheck disable=SC2086  # word-splitting of the package list is intended
    quietly apt-get install -y -qq --no-install-recommends $missing \
        || die "apt-get install $missing failed"
}

install_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON)"
    "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1 && return 0
    quietly "$PYTHON" -m pip install -q --disable-pip-version-check "$PLAYWRIGHT_SPEC" \
        || die "pip install $PLAYWRIGHT_SPEC into $PYTHON failed"
}

install_wscat() {
    [[ -x "$TOOLS/node_modules/.bin/wscat" ]] && return 0
    mkdir -p "$TOOLS" || die "cannot create $TOOLS"
    quietly npm install --prefix "$TOOLS" --no-audit --no-fund --no-update-notifier \
        --loglevel=error "$WSCAT_SPEC" || die "npm install $WSCAT_SPEC into $TOOLS failed"
    [[ -x "$TOOLS/node_modules/.bin/wscat" ]] || die "wscat installed but $TOOLS/node_modules/.bin/wscat is missing"
}

install_debs
install_python
install_wscat
