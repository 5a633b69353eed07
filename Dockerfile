# seresnet-serve: a build stage compiles the SqueezeExcitation op library (CPU + CUDA kernels)
# into the wheel; the runtime stage holds Python, onnxruntime-gpu, the package and the embedded
# model: no torch, no compiler, no CUDA base image (CUDA and cuDNN come from PyPI wheels; the
# NVIDIA Container Toolkit supplies the driver).
#
#   docker compose up -d                                          # GPU, see docker-compose.yml
#   docker build -t seresnet-serve:cpu --build-arg VARIANT=cpu .  # CPU only, ~1/4 of the size
#
# VARIANT=gpu (default) adds onnxruntime-gpu[cuda,cudnn] and compiles the CUDA kernel;
# VARIANT=cpu skips both (onnxruntime-gpu alone runs the CPU provider). Base images are
# Debian's own, so that a locally made one can stand in for them (scripts/container-e2e.sh).

ARG BASE_IMAGE=debian:trixie-slim

# ---- requirements: the dependency list alone, so code changes keep the dependency layer ----
FROM ${BASE_IMAGE} AS requirements
ARG VARIANT=gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml scripts/container/requirements.py /src/
RUN case "$VARIANT" in \
      gpu) extras=gpu ;; \
      cpu) extras= ;; \
      *) echo "VARIANT must be gpu or cpu (got '$VARIANT')" >&2; exit 2 ;; \
    esac \
    && python3 /src/requirements.py /src/pyproject.toml $extras > /requirements.txt

# ---- build: the op library and the wheel ----------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG VARIANT=gpu
# A package index mirror, where the building machine needs one: build-time only, not kept in
# the image's environment. (HTTP(S)_PROXY/NO_PROXY pass through as Docker's predefined args.)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
# nvcc from NVIDIA's PyPI wheels; 13.0 matches the CUDA build of onnxruntime-gpu 1.31. Every
# piece pinned: nvcc's own dependencies are unpinned, and a newer crt/nvvm breaks nvcc 13.0.
ARG CUDA_VERSION=13.0
ARG CUDA_WHEELS="nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-culibos"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# libonnxruntime-dev: ORT 1.21 headers (API 21), old enough for every runtime we support.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
         ca-certificates cmake g++ make libonnxruntime-dev python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install "scikit-build-core>=0.10"
# The wheels unpack to site-packages/nvidia/cu13: give it the layout of a CUDA toolkit.
RUN if [ "$VARIANT" = gpu ]; then \
      /opt/build/bin/pip install $(for w in $CUDA_WHEELS; do echo "$w==$CUDA_VERSION.*"; done) \
      && cu="$(echo /opt/build/lib/python3*/site-packages/nvidia/cu13)" \
      && test -x "$cu/bin/nvcc" \
      && mkdir -p "$cu/targets/x86_64-linux" \
      && ln -s ../../include "$cu/targets/x86_64-linux/include" \
      && ln -s ../../lib "$cu/targets/x86_64-linux/lib" \
      && ln -s lib "$cu/lib64" \
      && ln -s "$cu" /usr/local/cuda; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ops ops
COPY modelcard modelcard
COPY service service
COPY client client
COPY export export
RUN cuda=OFF; [ "$VARIANT" = gpu ] && cuda=ON; \
    SERESNET_CUDA=$cuda CUDACXX="$([ "$cuda" = ON ] && echo /usr/local/cuda/bin/nvcc)" \
    /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /dist \
      -C cmake.define.SERESNET_CUDA=$cuda . \
    && ls -l /dist

# ---- runtime ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
         --shell /usr/sbin/nologin seresnet \
    && python3 -m venv /opt/venv
# Dependencies first (the multi-GB CUDA/cuDNN wheels for VARIANT=gpu): reused across code changes.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
COPY models/fashion-seresnet /models/fashion-seresnet

# NVIDIA_DRIVER_CAPABILITIES: the driver libraries the NVIDIA Container Toolkit mounts (ignored
# where there is no GPU). ORT_DISABLE_TELEMETRY: onnxruntime's usage telemetry (on by default
# since 1.29) stays off in a server image: no outbound connection, no device-ID file.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ORT_DISABLE_TELEMETRY=1 \
    SERESNET_HOST=0.0.0.0 \
    SERESNET_PORT=8000 \
    SERESNET_GRPC_PORT=8001 \
    SERESNET_MODEL_DIR=/models/fashion-seresnet
USER seresnet
# HTTP, and the Open Inference Protocol over gRPC (Triton's ports).
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# Ready only after warm-up; the first check may wait out start-period while it runs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --start-interval=2s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SERESNET_PORT', '8000') + '/v2/health/ready', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "seresnet-serve"]
CMD []
