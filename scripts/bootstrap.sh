#!/usr/bin/env bash
# Installs what is missing: a Python >= 3.11 venv in .venv with requirements.txt,
# and a redis-server (the system one, else apt-get as root, else says what to install).
# Idempotent and quiet when there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    return 1
  fi
  say "installing $* with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Python venv ----------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  PY="$(find_python)" || {
    echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  if ! "$PY" -m venv .venv 2>/dev/null; then
    apt_install python3-venv || {
      echo "error: '$PY -m venv' failed; install the python3-venv package" >&2; exit 1; }
    "$PY" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.requirements.sha
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing Python packages into .venv (torch is large: a few minutes the first time)"
  # torch's CUDA build with its nvidia-* wheels is ~6 GB installed; the downloads need ~3 GB more
  # while pip runs. --no-cache-dir keeps pip from leaving a second copy of them in ~/.cache/pip.
  free_kb="$(df -Pk .venv | awk 'NR==2 {print $4}')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024 / 1024)) GB free here; installing the packages needs about 10 GB" >&2
  fi
  .venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# --- Redis ------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server || {
    echo "error: redis-server (7.x) is needed: 'sudo apt-get install redis-server' on Debian/Ubuntu," >&2
    echo "       or put a redis-server binary on PATH" >&2; exit 1; }
  # The Debian package may start a system service on 6379; ours runs under supervisord.
  if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
fi
exit 0
