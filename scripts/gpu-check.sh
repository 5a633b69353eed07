#!/usr/bin/env bash
# Issue 11's GPU verification in ONE device run of at most 10 minutes, after the set-up of
# ../shared/gpu/README.md (prepare.sh here, then its five set-up runs there):
#
#   run: source .gpu/device.sh && bash scripts/gpu-check.sh
#        carrying .gpu/device.sh and .gpu/lib (the op library with the fp16 and channels-last
#        kernels: rebuild .venv's library and rerun prepare.sh after changing ops/)
#
# In order, each step bounded so that the whole stays under BUDGET_S (default 560 s):
#   1. the CUDA kernel tests: tests/test_ops_kernel.py (fp32/fp16 x NCHW/NHWC against NumPy),
#      tests/test_ops_library.py, tests/test_ops_cuda_graph.py (graph replays of the fused op),
#      tests/test_service_engine_cuda.py (the service's engine: fp16 and CUDA graphs)
#   2. python -m bench.gpu_checks: fp16 parity on real images, graph-replay equality of whole
#      fused networks, Transposes left by prefer_nhwc       -> gpu_checks.json
#   3. python -m bench.fusion --provider cuda: fp16/TF32/fp32 x NCHW/NHWC x CUDA graphs off/on
#      x batch 1/8/32/128, SE-ResNet-50 (fused, fused channels-last, unfused) and ResNet-50,
#      PyTorch eager fp16 channels_last as the anchor      -> fusion_cuda.json
#      (rewritten after every group: cut short by the budget, it keeps what it measured)
# Results and the log go to $OUT when set (what the device run brings back), else bench/results;
# copy them into bench/results/ here afterwards.
#
#   bash scripts/gpu-check.sh --dry-run   on this machine, without a GPU: the same steps on the
#                                         CPU provider with small nets (plumbing, not speed)
#   bash scripts/gpu-check.sh --frontend  a second run (issues 12, 9): the service's engine on
#                                         CUDA (fp16, CUDA graphs), HTTP against the raw engine,
#                                         and the V2 sweep (tritonclient) on SE-ResNet-50
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

budget=${BUDGET_S:-560}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
results=${OUT:-bench/results}
[ "$dry_run" = 1 ] && results=build/gpu-check-dry-run
mkdir -p "$results"
exec > >(tee "$results/gpu-check.log") 2>&1

if [ "$dry_run" = 1 ]; then
  py=${PYTHON:-.venv/bin/python}
  [ -x "$py" ] || py=python3
  cache=build/bench-models
else
  py=${PYTHON:-python3}
  cache=${TMPDIR:-/tmp}/seresnet-bench-models  # survives between runs while the machine stays warm
  if [ "${GPU_READY:-0}" != 1 ]; then
    echo "gpu-check: run 'source .gpu/device.sh' first (../shared/gpu/README.md)"; exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
"$py" -c "import onnxruntime as o, ops; print('onnxruntime', o.__version__, \
o.get_available_providers()); print('op library', ops.library_path(), sorted(ops.kernels()))"

status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  local allowed=$(( seconds < $(left) ? seconds : $(left) ))
  if [ "$allowed" -le 10 ]; then echo "== $name: skipped, budget spent"; status=1; return; fi
  echo "== $name (at most ${allowed}s, $(left)s left)"
  timeout --signal=INT --kill-after=10 "$allowed" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s in all"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

if [ "${1:-}" = "--frontend" ]; then
  # Issue 12's GPU measurement, its own run: SE-ResNet-50 through HTTP (the service's default
  # workers, batch 64, 256 concurrent single-image clients, then 8-image requests) against
  # the raw engine at the same batch and precision -> gpu_frontend.json
  step "service engine on CUDA" 120 "$py" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_service_engine_cuda.py
  step "http vs raw engine" 450 "$py" -m bench.gpu_frontend --seconds 8 --rounds 2 --v2 \
    --out "$results/gpu_frontend.json"
  echo "gpu-check --frontend: $( [ $status = 0 ] && echo 'all steps passed' || \
    echo 'SOME STEPS FAILED' ) in $(( $(date +%s) - start ))s; results in $results"
  exit $status
fi
step "kernel tests" 120 "$py" -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_ops_kernel.py tests/test_ops_library.py tests/test_ops_cuda_graph.py \
  tests/test_service_engine_cuda.py
if [ "$dry_run" = 1 ]; then
  step "gpu checks" 240 "$py" -m bench.gpu_checks --dry-run --cache "$cache" \
    --out "$results/gpu_checks.json"
  step "fusion matrix" 240 "$py" -m bench.fusion --provider cpu --dry-run --cache "$cache" \
    --threads 2 --out "$results/fusion_cuda.json"
else
  step "gpu checks" 220 "$py" -m bench.gpu_checks --cache "$cache" \
    --out "$results/gpu_checks.json"
  # fp16 first: it is what the goals are about; whatever the budget cuts comes last
  step "fusion matrix" 600 "$py" -m bench.fusion --provider cuda --cache "$cache" \
    --precision fp16 tf32 fp32 --graphs on off --batch 1 8 32 128 --repeats 3 --seconds 0.1 \
    --out "$results/fusion_cuda.json"
fi
echo "gpu-check: $( [ $status = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED' )" \
  "in $(( $(date +%s) - start ))s; results in $results"
exit $status
