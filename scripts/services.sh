#!/usr/bin/env bash
# The real servers the tests start for themselves; this only makes sure their
# binaries are installed. Source it (scripts/test does) and call
# ensure_test_services, or run `bash scripts/services.sh ensure_redis_server`.
# Each function is idempotent and quiet: it prints one line only when it installs.

_apt_install() {
  # $@: Debian packages; as root, or through sudo when there is one
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "services.sh: need root (or sudo) to apt-get install $*" >&2
      return 1
    fi
    sudo="sudo"
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "services.sh: no apt-get here: install $* with this system's package manager" >&2
    return 1
  fi
  echo "==> installing $* (apt-get)"
  local log
  log=$(mktemp)
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
      >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "services.sh: apt-get install $* failed" >&2
    return 1
  fi
  rm -f "$log"
}

ensure_redis_server() {
  # redis-server for tests/test_redis_ledger.py (the tests start it on a free port themselves)
  if command -v redis-server >/dev/null 2>&1; then
    return 0
  fi
  _apt_install redis-server || return 1
  command -v redis-server >/dev/null 2>&1 || {
    echo "services.sh: redis-server is still not on PATH after installing it" >&2
    return 1
  }
}

ensure_test_services() {
  ensure_redis_server
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  "${@:-ensure_test_services}"
fi
