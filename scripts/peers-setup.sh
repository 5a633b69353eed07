#!/usr/bin/env bash
# Make the virtual environments bench.peers drives, one per peer, under
# ${SERESNET_PEERS_DIR:-~/.cache/seresnet-peers}: never in the project's .venv (each peer pins
# its own web stack). torchserve also needs a Java 17 runtime (Debian: openjdk-17-jre-headless).
#   scripts/peers-setup.sh              # kserve, torchserve, mlserver and triton
#   scripts/peers-setup.sh kserve
set -euo pipefail
dir="${SERESNET_PEERS_DIR:-$HOME/.cache/seresnet-peers}"
python="${PYTHON:-python3}"
# The same ONNX Runtime and Pillow as the service's, so only the serving differs.
common=(onnxruntime==1.31.1 pillow==13.0.0 numpy pydantic)
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(kserve torchserve mlserver triton)
mkdir -p "$dir"
for peer in "${peers[@]}"; do
  case "$peer" in
    kserve) packages=(kserve==0.21.0) ;;
    # A pinned CPU torch (TorchServe's handler base imports it), never a bare `torch`; pyyaml
    # is a TorchServe worker import it does not declare.
    torchserve) packages=(torch==2.13.0 torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml)
      command -v java >/dev/null || echo "note: no java on PATH (apt-get install openjdk-17-jre-headless)" >&2 ;;
    mlserver) packages=(mlserver==1.7.1) ;;
    # The wheel bundles the tritonserver binary and its libraries (Linux x86-64).
    triton) packages=(nvidia-pytriton==0.7.0) ;;
    *) echo "unknown peer $peer (kserve, torchserve, mlserver, triton)" >&2; exit 2 ;;
  esac
  echo "== $dir/$peer" >&2
  "$python" -m venv "$dir/$peer"
  "$dir/$peer/bin/pip" install -q "${packages[@]}" "${common[@]}"
done
