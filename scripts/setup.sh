#!/usr/bin/env bash
# Installs what building and testing token-exchange needs on a fresh Debian 12 machine.
# Idempotent and quiet when everything is already in place; safe to run with no stdin (CI).
#
#   scripts/setup.sh          system packages (cmake, ...), the Python test venv, and the console's browser
#                             test (Debian chromium, tests/console/node_modules)
#   scripts/setup.sh --system system packages only (enough to build and run the gateway)
#   scripts/setup.sh --bench  system packages and what bench/run needs (wrk, the mysql client); nginx is
#                             measured only when it is installed, so it is not installed here
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
requirements="$repo/tests/python/requirements.txt"
want_venv=1
want_bench=0
[[ "${1:-}" == "--system" ]] && want_venv=0
[[ "${1:-}" == "--bench" ]] && want_venv=0 && want_bench=1

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        log "need root to run: $*"
        return 1
    fi
}

apt_install() {
    log "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have stale or empty package lists: update once and retry.
    if ! as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
        as_root apt-get update -qq >/dev/null
        as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}

# --- system packages -------------------------------------------------------------------------------
# Pingora builds zlib-ng with cmake and links OpenSSL (found through pkg-config).
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
if ! pkg-config --exists openssl 2>/dev/null; then missing+=(libssl-dev); fi
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi

# --- the benchmark's load generator (bench/run) -------------------------------------------------------
if ((want_bench)); then
    missing=()
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v mysql >/dev/null 2>&1 || missing+=(mariadb-client)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
    fi
fi

if ((want_venv == 0)); then
    exit 0
fi

# --- Python venv with the official OpenAI SDK (used by the SDK integration tests) -------------------
# The stamp holds the hash of the requirements file, so a changed pin reinstalls and an unchanged one
# costs nothing.
setup_venv() {
    local stamp="$venv/.requirements.sha256" want_hash python
    want_hash="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_hash" ]] \
        && "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
        return 0
    fi

    python="${PYTHON:-python3}"
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "creating $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
    log "installing $(grep -v '^#' "$requirements" | xargs) into .venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
    "$venv/bin/python" -c 'import openai; print("setup: openai", openai.__version__, file=__import__("sys").stderr)'
    echo "$want_hash" >"$stamp"
}

# --- The console's browser test (tests/console_e2e.rs) ---------------------------------------------
# Debian's Chromium, driven by playwright-core from tests/console (whose own browser download cannot work
# here). node_modules is reinstalled with `npm ci` when package-lock.json changed (a stamp holds its hash).
setup_console() {
    local project="$repo/tests/console" stamp want_hash
    if [[ ! -x /usr/bin/chromium ]]; then
        apt_install chromium
    fi
    if ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm
    fi
    stamp="$project/node_modules/.package-lock.sha256"
    want_hash="$(sha256sum "$project/package-lock.json" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_hash" && -d "$project/node_modules/playwright-core" ]]; then
        return 0
    fi
    log "installing tests/console/node_modules (npm ci)"
    (cd "$project" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$want_hash" >"$stamp"
}

setup_venv
setup_console
