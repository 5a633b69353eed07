#!/usr/bin/env bash
# Real end-to-end check of the Dockerfile and docker-compose.yml on a machine with no Docker
# engine and no registry access (docs/design.md §8, Containers). Run as root: `make container-check`.
#
#  1. fetches Debian's docker.io, docker-cli, containerd, runc, tini and trixie's docker-compose
#     (Compose v2) and debootstrap packages with a private apt configuration taken from this
#     machine's own apt sources, and unpacks them into a temporary folder (installs nothing);
#  2. starts dockerd by hand with its own data-root, exec-root, pidfile and socket there;
#  3. builds the Dockerfile's base image(s) with `debootstrap --variant=minbase` (cached), adds
#     this machine's CA certificates, and `docker import`s them under the FROM lines' names;
#  4. `docker compose config -q` for the GPU and the CPU stacks, then `docker compose up -d
#     --build --wait` of the CPU stack (host networking, test-only override), posts real
#     Fashion-MNIST images to /classify from the host (127.0.0.1) and checks the top-5 answer;
#  5. checks the image (no torch, no compiler) and the bad-input behaviour (empty models
#     volume, bad SERESNET_* values, no GPU) and that compose does not restart a broken
#     configuration forever; then `docker compose down`;
#  6. builds the GPU image too (CUDA kernel by nvcc from NVIDIA's PyPI wheels, CUDA/cuDNN
#     wheels), checks its content and that without a GPU it serves on the CPU, as documented;
#  7. prints image size, build time, time to healthy and total time, and on any exit, failure
#     included, stops what it started (by pid) and undoes what the engine changed.
#
# Environment: SERESNET_CACHE_DIR (cache root, default ~/.cache/seresnet-serve: .debs, base
# image tarballs), SERESNET_DEBIAN_MIRROR (Debian archive URI, default: from apt's sources),
# FASHION_MNIST_DIR (test images; default: Debian's dataset-fashion-mnist, fetched if absent),
# SERESNET_E2E_GPU=image|stage|off (step 6: the whole GPU image, the default; only its build
# stage, which skips ~2 GB of CUDA/cuDNN wheels; or neither),
# SERESNET_E2E_SUMMARY=FILE (write the numbers as JSON).
set -euo pipefail

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$REPO/scripts/container"
HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE="${SERESNET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seresnet-serve}/container"
MODEL_NAME=fashion-seresnet
SERVICE=seresnet
CPU_IMAGE=seresnet-serve:cpu
GPU_IMAGE=seresnet-serve:gpu

say() { echo "container-e2e: $*"; }
die() { echo "container-e2e: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "run as root (it starts a Docker engine)"
for tool in apt-get dpkg tar awk python3 ip nice timeout mktemp; do
  command -v "$tool" > /dev/null || die "$tool not found"
done
[ -f "$REPO/models/$MODEL_NAME/model.json" ] || die "models/$MODEL_NAME/model.json missing"

# Settings of the shell running this must not leak into the stacks under test.
while read -r var; do
  case "$var" in SERESNET_CACHE_DIR|SERESNET_DEBIAN_MIRROR|SERESNET_E2E_*) ;; *) unset "$var" ;; esac
done < <(compgen -e | grep -E '^(SERESNET_|COMPOSE_)' || true)

# shellcheck source=scripts/container/debian-apt.sh
. "$HERE/debian-apt.sh"
# shellcheck source=scripts/container/engine.sh
. "$HERE/engine.sh"
# shellcheck source=scripts/container/base-image.sh
. "$HERE/base-image.sh"

T_START=$(now)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/seresnet-e2e.XXXXXX")
STACK_UP=
COMPOSE_E2E=()
# Checks passed so far, for the closing "N passed, N failed" line.
PASSED=0
passed() { PASSED=$((PASSED + 1)); }

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$STACK_UP" ]; then
    timeout 120 docker compose "${COMPOSE_E2E[@]}" down --timeout 45 > /dev/null 2>&1
  fi
  engine_stop
  rm -rf --one-file-system "$WORK"
  if [ "$rc" -eq 0 ]; then
    say "cleaned up (engine stopped, temporary folder removed)"
    echo "container-check: $PASSED passed, 0 failed"
  else
    echo "container-e2e: FAILED (exit $rc) after $(since "$T_START") s; cleaned up" >&2
    echo "container-check: $PASSED passed, 1 failed"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. packages ------------------------------------------------------------------------------
say "fetching Docker engine, Compose v2 and debootstrap packages (cache: $CACHE)"
apt_private_init "$CACHE/apt"
engine_fetch "$CACHE" "$WORK/engine"
if [ -z "${FASHION_MNIST_DIR:-}" ]; then
  FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
  if [ ! -f "$FASHION_MNIST_DIR/t10k-images-idx3-ubyte.gz" ]; then
    apt_private_download "$CACHE/debs/data" "dataset-fashion-mnist/$(host_codename)"
    dpkg -x "$CACHE"/debs/data/dataset-fashion-mnist_*.deb "$WORK/data"
    FASHION_MNIST_DIR="$WORK/data/usr/share/datasets/fashion-mnist"
  fi
fi
export FASHION_MNIST_DIR

# --- 2. engine, 3. base images -----------------------------------------------------------------
mkdir -p "$WORK/docker"
engine_start "$WORK/docker" "$WORK/engine"
T_BASE=$(now)
mapfile -t BASE_IMAGES < <(dockerfile_base_images "$REPO/Dockerfile")
[ ${#BASE_IMAGES[@]} -gt 0 ] || die "no base image found in the Dockerfile's FROM lines"
for image in "${BASE_IMAGES[@]}"; do
  base_image_import "$image" "$CACHE" "$WORK"
done
BASE_S=$(since "$T_BASE")

# --- 4. compose ---------------------------------------------------------------------------------
cd "$REPO"
SERESNET_E2E_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SERESNET_E2E_PORT
# Build args from this machine's own configuration (proxies, a pip index mirror): generated
# here, never committed. JSON is YAML.
python3 - "$WORK/compose.host.yml" <<'EOF'
import json, os, subprocess, sys

args = {k: v for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                       "NO_PROXY") if (v := os.environ.get(k))}
def pip_config(key: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", key],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""
def remote(urls: str) -> str:  # file:// indexes are on this machine only
    return " ".join(u for u in urls.split() if u.startswith(("http://", "https://")))
for env, key in (("PIP_INDEX_URL", "global.index-url"),
                 ("PIP_EXTRA_INDEX_URL", "global.extra-index-url"),
                 ("PIP_TRUSTED_HOST", "global.trusted-host")):
    value = os.environ.get(env) or pip_config(key)
    value = remote(value) if env != "PIP_TRUSTED_HOST" else value
    if value:
        args[env] = value
if "http_proxy" not in args:
    r = subprocess.run(["apt-config", "shell", "P", "Acquire::http::Proxy"],
                       capture_output=True, text=True)
    line = r.stdout.strip()
    if line.startswith("P="):
        args["http_proxy"] = line[2:].strip("'\"")
spec = {"services": {"seresnet": {"build": {"args": args}}}} if args else {}
with open(sys.argv[1], "w") as f:
    json.dump(spec or {"services": {"seresnet": {}}}, f)
print("container-e2e: build args from this machine's configuration: "
      + (", ".join(sorted(args)) or "none needed"))
EOF
mapfile -t HOST_BUILD_ARGS < <(python3 -c '
import json, sys
spec = json.load(open(sys.argv[1]))["services"]["seresnet"]
for k, v in spec.get("build", {}).get("args", {}).items():
    print("--build-arg"); print(f"{k}={v}")' "$WORK/compose.host.yml")
COMPOSE_GPU=(-f docker-compose.yml)
COMPOSE_CPU=(-f docker-compose.yml -f docker-compose.cpu.yml)
COMPOSE_E2E=("${COMPOSE_CPU[@]}" -f scripts/container/compose.e2e.yml -f "$WORK/compose.host.yml")

say "docker compose config -q (GPU stack, CPU stack, test override)"
docker compose "${COMPOSE_GPU[@]}" config -q
docker compose "${COMPOSE_CPU[@]}" config -q
docker compose "${COMPOSE_E2E[@]}" config -q
grep -q 'driver: nvidia' <(docker compose "${COMPOSE_GPU[@]}" config) \
  || die "the GPU stack reserves no GPU"
if docker compose "${COMPOSE_CPU[@]}" config | grep -q 'driver: nvidia'; then
  die "the CPU stack still reserves a GPU"
fi
passed

say "building the CPU image (docker compose build; log: build.log)"
T_BUILD=$(now)
if ! docker compose "${COMPOSE_E2E[@]}" build --progress plain > "$WORK/build.log" 2>&1; then
  tail -n 60 "$WORK/build.log" >&2
  die "docker compose build"
fi
BUILD_S=$(since "$T_BUILD")
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$CPU_IMAGE")
say "built $CPU_IMAGE in $BUILD_S s: $((IMAGE_BYTES / 1000000)) MB"
passed

say "docker compose up -d --build --wait (CPU stack on 127.0.0.1:$SERESNET_E2E_PORT)"
T_UP=$(now)
STACK_UP=1
if ! timeout 900 docker compose "${COMPOSE_E2E[@]}" up -d --build --wait --wait-timeout 600 \
     > "$WORK/up.log" 2>&1; then
  cat "$WORK/up.log" >&2
  docker compose "${COMPOSE_E2E[@]}" logs --tail 40 >&2 || true
  die "docker compose up --wait"
fi
UP_S=$(since "$T_UP")
CID=$(docker compose "${COMPOSE_E2E[@]}" ps -q "$SERVICE")
# From the container's start to the end of its first passing health probe.
HEALTHY_S=$(docker inspect "$CID" | python3 -c '
import json, sys
from datetime import datetime
def t(s):  # RFC 3339 with nanoseconds -> seconds
    s = s.rstrip("Z"); base, _, frac = s.partition(".")
    return datetime.fromisoformat(base).timestamp() + float("0." + (frac or "0")[:9].split("+")[0])
st = json.load(sys.stdin)[0]["State"]
ok = [e for e in st["Health"]["Log"] if e["ExitCode"] == 0]
print("%.1f" % (t(ok[0]["End"]) - t(st["StartedAt"])))')
say "healthy ${HEALTHY_S} s after the container started (up --wait took $UP_S s)"
passed
docker logs "$CID" 2>&1 | tail -n 3 | cut -c1-200 | sed 's/^/  log: /'

say "POST /classify with real images from the host"
python3 "$HERE/classify_check.py" --url "http://127.0.0.1:$SERESNET_E2E_PORT" \
  --card "models/$MODEL_NAME/model.json" --expect-provider cpu \
  || die "classify check"
passed

# --- 5. image content, bad input ---------------------------------------------------------------
# No torch, no compiler, not root; $2 = the execution providers the op library must cover.
check_image_content() {
  local image=$1 providers=$2
  say "image content of $image: no torch, no compiler, non-root user"
  docker run --rm --network none --entrypoint python "$image" -c '
import importlib.util, os, shutil, sys
if importlib.util.find_spec("torch") is not None: sys.exit("torch is installed")
cc = [c for c in ("cc", "gcc", "g++", "c++", "clang", "nvcc", "cmake", "make") if shutil.which(c)]
if cc: sys.exit(f"compilers/build tools in the runtime image: {cc}")
if os.getuid() == 0: sys.exit("runs as root")
import ops, onnxruntime
have = sorted(ops.providers())
print(f"  uid {os.getuid()}, onnxruntime {onnxruntime.__version__}, op library kernels {have}")
missing = set(sys.argv[1].split(",")) - set(have)
if missing: sys.exit(f"op library lacks kernels for {sorted(missing)}")
' "$providers" || die "runtime image content ($image)"
  passed
}
check_image_content "$CPU_IMAGE" CPUExecutionProvider

# Expect a non-zero exit within a minute, and one line naming $2 (no traceback).
expect_clear_failure() {
  local what=$1 needle=$2 rc out
  shift 2
  set +e
  out=$(timeout 120 docker run --rm --network none "$@" "$CPU_IMAGE" 2>&1)
  rc=$?
  set -e
  [ "$rc" -ne 0 ] || die "$what: the container exited 0"
  [ "$rc" -ne 124 ] || die "$what: the container was still running after 120 s"
  grep -q "Traceback" <<< "$out" && { echo "$out" >&2; die "$what: a traceback instead of one line"; }
  grep -q -- "$needle" <<< "$out" || { echo "$out" >&2; die "$what: no line naming $needle"; }
  say "$what -> exit $rc: $(grep -m 1 -- "$needle" <<< "$out" | cut -c1-200)"
  passed
}
mkdir -p "$WORK/empty-models"
expect_clear_failure "empty models volume" SERESNET_MODEL_DIR -v "$WORK/empty-models:/models:ro"
expect_clear_failure "bad SERESNET_MAX_BATCH_SIZE" SERESNET_MAX_BATCH_SIZE -e SERESNET_MAX_BATCH_SIZE=lots
expect_clear_failure "SERESNET_PROVIDER=cuda without a GPU" SERESNET_PROVIDER -e SERESNET_PROVIDER=cuda

say "docker compose down"
T_DOWN=$(now)
docker compose "${COMPOSE_E2E[@]}" down --timeout 45 > "$WORK/down.log" 2>&1 \
  || { cat "$WORK/down.log" >&2; die "docker compose down"; }
STACK_UP=
DOWN_S=$(since "$T_DOWN")
[ -z "$(docker ps -aq)" ] || die "containers left after down"
passed

# A broken setting under compose: the container stops after its 3 restarts, no endless loop.
say "compose with a bad setting: exits and is restarted at most 3 times"
STACK_UP=1
SERESNET_MAX_BATCH_SIZE=0 docker compose "${COMPOSE_E2E[@]}" up -d --no-build > /dev/null 2>&1 || true
CID=$(docker compose "${COMPOSE_E2E[@]}" ps -aq "$SERVICE")
STATE=
for _ in $(seq 1 120); do
  STATE=$(docker inspect -f '{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}' "$CID")
  case "$STATE" in exited*) break ;; esac
  sleep 1
done
case "$STATE" in "exited 3 "[1-9]*) ;; *) die "bad setting under compose: state '$STATE'" ;; esac
say "  state: $STATE (status, restarts, exit code); last log line:" \
    "$(docker logs "$CID" 2>&1 | tail -n 1 | cut -c1-200)"
passed
docker compose "${COMPOSE_E2E[@]}" down --timeout 10 > /dev/null 2>&1
STACK_UP=

# --- 6. the GPU image, on this machine without a GPU -------------------------------------------
# image: the whole GPU image (CUDA/cuDNN wheels: ~2 GB more to download), then served on the
# CPU as documented; stage: only its build stage, i.e. the CUDA kernel compiles; off: neither.
GPU_MODE=${SERESNET_E2E_GPU:-image}
GPU_BYTES=0
GPU_BUILD_S=0
GPU_HEALTHY_S=0
case "$GPU_MODE" in
  image)
    say "building the GPU image (docker compose build of the GPU stack; log: build-gpu.log)"
    T_GPU=$(now)
    docker compose -f docker-compose.yml -f scripts/container/compose.e2e.yml \
      -f "$WORK/compose.host.yml" build --progress plain > "$WORK/build-gpu.log" 2>&1 \
      || { tail -n 60 "$WORK/build-gpu.log" >&2; die "GPU image build"; }
    GPU_BUILD_S=$(since "$T_GPU")
    GPU_BYTES=$(docker image inspect -f '{{.Size}}' "$GPU_IMAGE")
    say "built $GPU_IMAGE in $GPU_BUILD_S s: $((GPU_BYTES / 1000000)) MB"
    passed
    check_image_content "$GPU_IMAGE" CPUExecutionProvider,CUDAExecutionProvider
    # SERESNET_PROVIDER=auto without a GPU: the CPU provider, as documented.
    say "GPU image without a GPU: serves on the CPU"
    T_GPU=$(now)
    docker run -d --name seresnet-e2e-gpu --network host -e SERESNET_HOST=127.0.0.1 \
      -e SERESNET_PORT="$SERESNET_E2E_PORT" "$GPU_IMAGE" > /dev/null
    HEALTH=
    for _ in $(seq 1 300); do
      HEALTH=$(docker inspect -f '{{.State.Health.Status}}' seresnet-e2e-gpu)
      [ "$HEALTH" = healthy ] && break
      [ "$(docker inspect -f '{{.State.Running}}' seresnet-e2e-gpu)" = true ] \
        || { docker logs seresnet-e2e-gpu >&2; die "the GPU image exited without a GPU"; }
      sleep 1
    done
    [ "$HEALTH" = healthy ] || { docker logs seresnet-e2e-gpu >&2; die "GPU image: $HEALTH"; }
    GPU_HEALTHY_S=$(since "$T_GPU")
    python3 "$HERE/classify_check.py" --url "http://127.0.0.1:$SERESNET_E2E_PORT" \
      --card "models/$MODEL_NAME/model.json" --expect-provider cpu || die "GPU image on the CPU"
    passed
    docker rm -f seresnet-e2e-gpu > /dev/null
    ;;
  stage)
    say "building the GPU image's build stage (VARIANT=gpu: op library with the CUDA kernel)"
    T_GPU=$(now)
    DOCKER_BUILDKIT=0 docker build --network host --target build --build-arg VARIANT=gpu \
      "${HOST_BUILD_ARGS[@]}" -t seresnet-serve:gpu-build . > "$WORK/build-gpu.log" 2>&1 \
      || { tail -n 60 "$WORK/build-gpu.log" >&2; die "GPU build stage"; }
    GPU_BUILD_S=$(since "$T_GPU")
    # The build-info string compiled into the library (ops/CMakeLists.txt: SERESNET_BUILD_INFO).
    INFO=$(docker run --rm --network none --entrypoint python3 seresnet-serve:gpu-build -c '
import glob, re, zipfile
lib = zipfile.ZipFile(glob.glob("/dist/*.whl")[0]).read("ops/libseresnet_ops.so")
print(re.search(rb"ort_api=[^\x00]*", lib).group().decode())')
    case "$INFO" in *"cuda=13."*) ;; *) die "GPU build stage: no CUDA kernel ($INFO)" ;; esac
    say "  op library: $INFO ($GPU_BUILD_S s)"
    passed
    ;;
  off) ;;
  *) die "SERESNET_E2E_GPU must be image, stage or off (got '$GPU_MODE')" ;;
esac

TOTAL_S=$(since "$T_START")
cat <<EOF
container-e2e: summary
  CPU image size ($CPU_IMAGE)           $((IMAGE_BYTES / 1000000)) MB
  CPU image build (compose build)          $BUILD_S s
  time to healthy (start -> ready)         $HEALTHY_S s   (docker compose up --wait: $UP_S s)
  compose down                             $DOWN_S s
  base image(s) (debootstrap/import)       $BASE_S s
EOF
case "$GPU_MODE" in
  image) echo "  GPU image size ($GPU_IMAGE)           $((GPU_BYTES / 1000000)) MB, built in" \
              "$GPU_BUILD_S s, healthy on the CPU in $GPU_HEALTHY_S s" ;;
  stage) echo "  GPU build stage (CUDA kernel)            $GPU_BUILD_S s" ;;
esac
echo "  total                                    $TOTAL_S s"
if [ -n "${SERESNET_E2E_SUMMARY:-}" ]; then
  python3 -c 'import json, sys; k = sys.argv[2::2]; v = [float(x) for x in sys.argv[3::2]]; json.dump(dict(zip(k, v)), open(sys.argv[1], "w"), indent=2)' \
    "$SERESNET_E2E_SUMMARY" cpu_image_mb "$((IMAGE_BYTES / 1000000))" build_s "$BUILD_S" \
    healthy_s "$HEALTHY_S" up_wait_s "$UP_S" down_s "$DOWN_S" base_images_s "$BASE_S" \
    gpu_image_mb "$((GPU_BYTES / 1000000))" gpu_build_s "$GPU_BUILD_S" \
    gpu_healthy_s "$GPU_HEALTHY_S" total_s "$TOTAL_S"
fi
say "passed"
