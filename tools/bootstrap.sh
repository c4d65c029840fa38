#!/usr/bin/env bash
# Set up everything edgefl needs on a Debian machine: system packages (when permitted), a venv,
# the pinned CPU torch, and the package itself with its dev extra. Idempotent.
set -euo pipefail
VENV=${1:-.venv}
SYSTEM_PACKAGES=(mosquitto dataset-fashion-mnist)

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    echo "bootstrap: installing ${missing[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  else
    echo "bootstrap: WARNING: missing system packages: ${missing[*]}" >&2
    echo "bootstrap: install them with: sudo apt-get install ${SYSTEM_PACKAGES[*]}" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# torch first and pinned: anything unpinned would pull the CUDA build (several GB).
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
