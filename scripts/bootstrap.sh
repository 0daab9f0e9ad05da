#!/usr/bin/env bash
# Creates .venv with tuneloom and what the chosen extras need. Safe to run again: it only
# installs what changed. Usage: scripts/bootstrap.sh [EXTRAS]   (default: train,models)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-train,models}"
python="${PYTHON:-python3}"
venv=.venv

if [[ ",$extras," == *",dev,"* ]] && ! command -v promtool >/dev/null 2>&1; then
  # promtool lints the metrics the components expose; Debian's prometheus package ships it.
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is missing: install Debian's 'prometheus' package (sudo apt-get install prometheus)" >&2
    exit 1
  fi
fi

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
stamp="$venv/.tuneloom-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/-}"
if [[ ! -e $stamp ]]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first, pinned: pip then takes the local CPU wheel instead of the CUDA build.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi
echo "environment ready: $venv (extras: $extras)"
