#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and onnxruntime-gpu (make gpu-setup), answer
# in one run whether the GPU path works and how fast it is.
#
# usage: bash scripts/gpu-check.sh [--short | --full] [--frontend] [--budget S] [--out DIR]
#                                  [--dry-run] [--help]
#
#   --short      (default) the decisive questions in about 6 minutes of GPU time:
#                  kernels   CUDA kernel tests, graph replays of the fused op, the service's
#                            engine on CUDA (fp16, CUDA graphs, warm-up on the serving thread)
#                  export    one random-weight SE-ResNet-50 folder (--benchmark-only: float16
#                            kept, card says parity_gated false), reused by every later step
#                  parity    python -m bench.gpu_checks: fp16 parity on real images, graph
#                            replays of whole networks, Transposes left by prefer_nhwc
#                  frontend  python -m bench.gpu_frontend: raw engine vs the HTTP service at
#                            the same batch and precision (fp16) on real photos, 1- and 8-image
#                            requests, the service's CPU ms per request and p99, time to ready,
#                            first-request latency and GPU memory per bucket, what is served
#                  se-tax    python -m bench.fusion --provider cuda: fp16 + CUDA graphs,
#                            SE-ResNet-50 (fused, channels-last) against ResNet-50
#   --full       the whole matrix instead of se-tax (fp16/tf32/fp32 x NCHW/NHWC x CUDA graphs
#                x batch 1/8/32/128) and longer frontend rounds with the V2 sweep
#   --frontend   only kernels' engine test, export and frontend (a second run)
#   --budget S   GPU seconds for the whole run (default: 360 short, 900 full); each step is
#                cut at what is left, and a step the budget cannot reach fails the check
#   --out DIR    where results go (default: $OUT when set, else bench/results):
#                gpu-check.json (steps, exit codes, seconds), gpu-checks.json,
#                gpu-frontend.json, gpu-fusion.json, gpu-check.log
#   --dry-run    print each step's command and estimated GPU seconds, check that they fit
#                the budget and that every entry point parses its arguments; runs no GPU work
#
# The check fails (exit 1) when a step fails or when the service's engine does not serve
# SE-ResNet-50 as fp16 with CUDA graphs on CUDA; the summary at the end
# (python -m bench.gpu_summary DIR) says why. Exit 2: bad arguments or no GPU set-up.
# Environment: PYTHON (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu-check: $*" >&2; echo "try: bash scripts/gpu-check.sh --help" >&2; exit 2; }

mode=short frontend_only=0 dry_run=0 budget="" out="${OUT:-bench/results}"
while [ $# -gt 0 ]; do
  case "$1" in
    --short) mode=short ;;
    --full) mode=full ;;
    --frontend) frontend_only=1 ;;
    --dry-run) dry_run=1 ;;
    --budget)
      [ $# -ge 2 ] || die "--budget needs a number of seconds"
      budget=$2; shift ;;
    --budget=*) budget=${1#--budget=} ;;
    --out)
      [ $# -ge 2 ] || die "--out needs a folder"
      out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done
if [ -z "$budget" ]; then
  budget=$([ "$mode" = full ] && echo 900 || echo 360)
fi
case "$budget" in '' | *[!0-9]*) die "--budget must be whole seconds, got '$budget'" ;; esac

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
cache=${TMPDIR:-/tmp}/seresnet-gpu-check  # survives between runs while the machine stays warm
model=$cache/seresnet50

# name|estimated GPU seconds|command  (the estimates come from the H200 runs of 2026-11-28:
# a random SE-ResNet-50 export 35 s, ResNet-50 25 s, the kernel tests 45 s)
steps=()
add() { steps+=("$1|$2|$3"); }
pytest_cuda="$py -m pytest -q -p no:cacheprovider -o addopts="
if [ "$frontend_only" = 1 ]; then
  add engine 45 "$pytest_cuda tests/test_service_engine_cuda.py"
else
  add kernels 60 "$pytest_cuda tests/test_ops_kernel.py tests/test_ops_library.py \
tests/test_ops_cuda_graph.py tests/test_service_engine_cuda.py"
fi
add export 40 "$py -m export onnx --arch seresnet50 --random-init --parity-images 8 \
--benchmark-only --out $model"
if [ "$frontend_only" = 0 ]; then
  add parity 80 "$py -m bench.gpu_checks --cache $cache --out $out/gpu-checks.json"
fi
if [ "$mode" = full ]; then
  add frontend 300 "$py -m bench.gpu_frontend --model-dir $model --precision fp16 --seconds 8 \
--rounds 2 --v2 --require-served fp16+graphs --out $out/gpu-frontend.json"
else
  add frontend 100 "$py -m bench.gpu_frontend --model-dir $model --precision fp16 --seconds 3 \
--rounds 1 --require-served fp16+graphs --out $out/gpu-frontend.json"
fi
if [ "$frontend_only" = 0 ]; then
  if [ "$mode" = full ]; then
    add matrix 420 "$py -m bench.fusion --provider cuda --cache $cache --precision fp16 tf32 \
fp32 --graphs on off --batch 1 8 32 128 --repeats 3 --seconds 0.1 --out $out/gpu-fusion.json"
  else
    add se-tax 70 "$py -m bench.fusion --provider cuda --cache $cache --precision fp16 \
--graphs on --batch 1 8 32 --repeats 3 --seconds 0.1 --out $out/gpu-fusion.json"
  fi
fi

total=0
for s in "${steps[@]}"; do total=$((total + $(cut -d'|' -f2 <<<"$s"))); done

if [ "$dry_run" = 1 ]; then
  what=$mode; [ "$frontend_only" = 1 ] && what="$mode --frontend"
  echo "gpu-check ($what, dry run): budget ${budget}s, results in $out"
  status=0
  for s in "${steps[@]}"; do
    IFS='|' read -r name seconds command <<<"$s"
    printf '  %-9s ~%4ss  %s\n' "$name" "$seconds" "$command"
    # Every entry point must at least parse its arguments here (no GPU needed for --help).
    entry=$(sed -E 's/.* -m ([a-z_.]+).*/\1/' <<<"$command")
    if [ "$entry" != pytest ] && ! "$py" -m "$entry" --help >/dev/null 2>&1; then
      echo "    ^ '$py -m $entry --help' fails"; status=1
    fi
  done
  echo "  summary   python -m bench.gpu_summary $out --require-served fp16+graphs"
  echo "  estimated ${total}s of GPU time for a budget of ${budget}s"
  if [ "$total" -gt "$budget" ]; then
    echo "gpu-check: the steps need about ${total}s, more than --budget ${budget}s"; status=1
  fi
  exit $status
fi

if [ "${GPU_READY:-1}" != 1 ]; then
  echo "gpu-check: GPU_READY=${GPU_READY} (the GPU environment is not set up)"; exit 2
fi
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: no NVIDIA driver here"; exit 2; }
if ! "$py" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in \
o.get_available_providers())"; then
  echo "gpu-check: $py has no onnxruntime with the CUDA provider (make gpu-setup)"; exit 2
fi
mkdir -p "$out" "$cache"
exec > >(tee "$out/gpu-check.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import onnxruntime as o, ops; print('onnxruntime', o.__version__, \
o.get_available_providers()); print('op library', ops.library_path(), sorted(ops.kernels()))"

start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
status=0
records=()
for s in "${steps[@]}"; do
  IFS='|' read -r name seconds command <<<"$s"
  if [ "$name" = export ] && [ -f "$model/model.json" ]; then
    echo "== export: $model is there already (exported by an earlier run)"
    records+=("{\"step\": \"export\", \"rc\": 0, \"seconds\": 0, \"cached\": true}")
    continue
  fi
  # A step gets its estimate twice over, never more than what is left.
  allowed=$((2 * seconds)); [ "$allowed" -gt "$(left)" ] && allowed=$(left)
  if [ "$allowed" -le 10 ]; then
    echo "== $name: not run, the budget is spent"; status=1
    records+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"budget\"}")
    continue
  fi
  echo "== $name (at most ${allowed}s, $(left)s left): $command"
  t0=$(date +%s)
  # shellcheck disable=SC2086  # the command is a word list by design
  timeout --signal=INT --kill-after=10 "$allowed" $command
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0))s"
  [ "$rc" -ne 0 ] && status=1
  records+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}")
done
{
  printf '{"benchmark": "gpu_check", "mode": "%s", "frontend_only": %s, "budget_s": %s, ' \
    "$mode" "$([ $frontend_only = 1 ] && echo true || echo false)" "$budget"
  printf '"seconds": %s, "status": %s, "steps": [' "$(($(date +%s) - start))" "$status"
  (IFS=,; printf '%s' "${records[*]}")
  printf ']}\n'
} >"$out/gpu-check.json"
"$py" -m bench.gpu_summary "$out" --require-served fp16+graphs || status=1
echo "gpu-check: $([ $status = 0 ] && echo 'all steps passed' || echo 'FAILED')" \
  "in $(($(date +%s) - start))s; results in $out"
exit $status
