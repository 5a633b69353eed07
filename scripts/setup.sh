#!/usr/bin/env bash
# Set up .venv for the runtime (no torch) or for development (runtime + export + dev extras).
# Installs missing Debian packages first (as root, or with sudo where it is available).
set -euo pipefail
mode=${1:-runtime}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
[ "$mode" = dev ] && [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] \
  && [ -z "${FASHION_MNIST_DIR:-}" ] && need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
if [ "$mode" = dev ]; then
  # A pinned CPU torch first, so the export extra's torch requirement is already met
  # and pip never resolves a multi-GB CUDA build on its own.
  "${pip[@]}" torch==2.13.0
  echo "setup: building seresnet-serve with the export and dev extras (compiles the op library)"
  "${pip[@]}" ".[export,dev]"
else
  echo "setup: building seresnet-serve (compiles the op library)"
  "${pip[@]}" .
fi
echo "setup: $mode environment ready in $VENV"
