#!/usr/bin/env bash
# Set up .venv: `runtime` (the service, no torch), `dev` (runtime + export + dev extras, one
# build of the op library), or `extras` (only the export + dev extras' packages, for a .venv
# whose runtime install is current). Installs missing Debian packages first (as root, or with
# sudo where it is available). Each long step says what it installs and roughly how long it
# takes; the times are from a 2-core machine with a fast mirror, first run (no pip cache).
set -euo pipefail
mode=${1:-runtime}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
case $mode in runtime | dev | extras) ;; *) echo "usage: $0 runtime|dev|extras" >&2; exit 2 ;; esac

step() { echo "setup [${SECONDS}s]: $*"; }

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
[ "$mode" != runtime ] && [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] \
  && [ -z "${FASHION_MNIST_DIR:-}" ] && need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  step "installing Debian packages: ${need[*]} (apt-get; about 1 minute)"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip

torch() {
  # A pinned CPU torch first, so the export extra's torch requirement is already met and pip
  # never resolves a multi-GB CUDA build on its own.
  step "installing torch 2.13.0 for the CPU (export extra; ~190 MB download, 1-2 minutes)"
  "${pip[@]}" torch==2.13.0
}

case $mode in
  runtime)
    step "installing seresnet-serve and its runtime packages (onnxruntime-gpu, fastapi, ...;" \
      "~350 MB download) and compiling the op library (~30 s): 1-2 minutes"
    "${pip[@]}" .
    ;;
  dev)
    torch
    step "installing seresnet-serve with the export and dev extras (onnxruntime-gpu, fastapi," \
      "pytest, ...; ~400 MB download) and compiling the op library once (~30 s): 1-2 minutes"
    "${pip[@]}" ".[export,dev]"
    ;;
  extras)
    torch
    # The package itself is installed and current: add only the extras' requirements, read
    # from pyproject.toml, instead of building the package (and the op library) again.
    mapfile -t requirements < <("$VENV/bin/python" - <<'PY'
import tomllib

with open("pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
print("\n".join(extras["export"] + extras["dev"]))
PY
)
    step "installing the export and dev extras: ${requirements[*]} (~1 minute)"
    "${pip[@]}" "${requirements[@]}"
    ;;
esac
step "$mode environment ready in $VENV"
