"""Service configuration: environment variables with the ``SERESNET_`` prefix (docs/design.md §5),
overridden by command-line flags. A bad value stops start-up with one line naming its source."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from service.engine.config import EngineConfig

ENV_PREFIX = "SERESNET_"
DEFAULT_MODEL = Path("models") / "fashion-seresnet"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def default_model_dir() -> Path:
    """``models/fashion-seresnet`` under the working directory, else beside the installed
    package (so ``python -m service`` works from a checkout and from elsewhere)."""
    if DEFAULT_MODEL.is_dir():
        return DEFAULT_MODEL
    return Path(__file__).resolve().parent.parent / DEFAULT_MODEL


def _cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs a cgroup v2 quota allows (a container's ``--cpus``), None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cores() -> int:
    """Cores this process may really use: its CPU affinity (taskset, cpusets), capped by a
    cgroup CPU quota, which affinity does not show inside a container."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = max(1, os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


class SettingsError(ValueError):
    """One line that names the variable (or flag) and what is wrong with its value."""


class Settings(BaseSettings):
    """Every knob of the service. Field ``x`` is read from ``SERESNET_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    host: str = Field("127.0.0.1", description="address to bind")
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="ingress worker processes (HTTP, decode, preprocess); 0 = one per core this "
        "process may use, less one for the engine (cgroup quota counted); 2 on 2 cores, 1 on 1",
    )
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC (Triton's 8001; 0: off)",
    )
    model_dir: Path = Field(default_factory=default_model_dir, description="model folder")
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="execution provider; auto = CUDA when a GPU is usable, else CPU"
    )
    graph: Literal["auto", "fused", "unfused"] = Field(
        "auto", description="model.se.onnx (fused SE ops) or model.onnx; auto = engine policy"
    )
    opt_level: Literal["auto", "basic", "extended", "all"] = Field(
        "auto", description="ONNX Runtime graph optimisation level; auto = engine policy"
    )
    device_id: int = Field(0, ge=0, description="CUDA device ordinal")
    max_batch_size: int = Field(32, ge=1, le=4096, description="largest batch one model run takes")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, le=60_000, description="longest an image waits for a batch to fill"
    )
    batch_wait: Literal["expected", "always"] = Field(
        "expected",
        description="when a batch that is not full waits (up to the delay): expected = only "
        "while other admitted images are still being decoded, so a lone request runs at once; "
        "always = every time (a fixed delay, as Triton's dynamic batcher)",
    )
    max_queue_size: int = Field(
        1024, ge=1, description="images admitted but not yet run; beyond it 503 + Retry-After"
    )
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="per-request deadline (504)")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="largest request body (413)")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest width*height, checked before decoding (413)"
    )
    max_images_per_request: int = Field(
        256, ge=1, description="most images in one request (413; 400 on /v2 infer)"
    )
    api_key: SecretStr | None = Field(
        None,
        description="if set, required as 'Authorization: Bearer KEY' on every route but "
        "the health checks and the page's static files",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ORT CPU threads; 0 = measured at start: one thread, unless every core "
        "runs a lone image at least 1.1x faster (then every core, ORT's pool spinning)",
    )
    preprocess_threads: int = Field(
        0, ge=0, description="decode/resize threads per worker; 0 = two"
    )
    decode_memory_mb: int = Field(
        768,
        ge=16,
        description="per worker: memory concurrent decodes may use (estimated from "
        "each header: pixels, mode conversions, EXIF transposes); an image that cannot fit is 413",
    )
    max_inflight_body_mb: int = Field(
        0,
        ge=0,
        description="per worker: request body bytes held at once, beyond it 503; "
        "0 = max(256, 2 x max body)",
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, le=2**24, description="request line + headers, beyond it 431"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="time to send a request's headers, beyond it 408"
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="idle keep-alive connections are closed after this"
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="per worker: open connections; beyond it idle ones are closed "
        "first, then new ones refused",
    )
    batch_buckets: Annotated[tuple[int, ...], NoDecode] = Field(
        (), description="CUDA batch shapes, e.g. 1,2,4,8 (empty: powers of two to max batch)"
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE", description="cuDNN algorithm search (paid once per bucket at warm-up)"
    )
    cuda_tf32: bool = Field(
        True,
        description="TF32 convolutions on CUDA (ONNX Runtime's default, ~2x fp32 on "
        "Ampere/Hopper); 0 keeps exact fp32",
    )
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto",
        description="fp16 = model.fp16.se.onnx on CUDA; int8 = model.int8.se.onnx on the "
        "CPU (the card must list it); auto = fp16 when the folder has it and the op library "
        "has the float16 CUDA kernel, int8 on the CPU when the card vouches for it and timed "
        "it faster on a CPU with the same int8 instructions, else fp32",
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="capture one CUDA graph per batch bucket at warm-up; auto = on for CUDA"
    )
    cuda_layout: Literal["auto", "nchw", "nhwc"] = Field(
        "auto",
        description="nhwc = the float16 graph with channels-last SE nodes and prefer_nhwc on "
        "CUDA; auto = nchw (channels first)",
    )
    warmup_rounds: int = Field(
        3,
        ge=1,
        le=100_000,
        description="warm-up runs per batch shape (CUDA graphs are captured on the second)",
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="on SIGTERM, report not ready at once but keep serving this long before "
        "draining, so a balancer that polls readiness (a Kubernetes Service, HAProxy) stops "
        "sending first; 0 = drain at once (a Kubernetes preStop sleep does the same)",
    )
    model_name: str | None = Field(
        None,
        description="name to serve the model under (/v2/models/NAME, /classify's 'model'), "
        "e.g. a KServe InferenceService's name; unset = the model card's name",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json lines or plain text")

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(
                f"{str(value)!r} is not a directory (a model folder, docs/design.md §3)"
            )
        return value

    @field_validator("model_name")
    @classmethod
    def _url_safe_name(cls, value: str | None) -> str | None:
        # The name is a path segment of every /v2/models/NAME route: keep it URL-safe.
        if value is not None and not MODEL_NAME_PATTERN.fullmatch(value):
            raise ValueError(
                "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit (it is a URL path segment)"
            )
        return value

    @field_validator("api_key")
    @classmethod
    def _ascii_key(cls, value: SecretStr | None) -> SecretStr | None:
        # HTTP headers are latin-1 on the wire and clients encode them as ASCII: any other
        # character could never match (and crashes common clients), so refuse it up front.
        if value is not None:
            secret = value.get_secret_value()
            if not secret.isascii() or not secret.isprintable() or secret != secret.strip():
                raise ValueError(
                    "must be printable ASCII without surrounding spaces (it is "
                    "sent in an HTTP header)"
                )
        return value

    @field_validator(
        "max_queue_delay_ms",
        "request_timeout_s",
        "drain_timeout_s",
        "shutdown_delay_s",
        "header_timeout_s",
        "keepalive_timeout_s",
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise ValueError("must be comma-separated positive integers, e.g. 1,4,16") from None
        return value

    @model_validator(mode="after")
    def _buckets_fit(self) -> Settings:
        if self.max_images_per_request > self.max_queue_size:
            raise ValueError(
                f"max_images_per_request: {self.max_images_per_request} exceeds max_queue_size="
                f"{self.max_queue_size}, so such a request could never be admitted"
            )
        if self.max_inflight_body_mb and self.max_inflight_body_mb * 2**20 < self.max_body_bytes:
            raise ValueError(
                f"max_inflight_body_mb: {self.max_inflight_body_mb} MiB is less than one "
                f"request body may be (max_body_bytes={self.max_body_bytes})"
            )
        if any(b < 1 for b in self.batch_buckets):
            raise ValueError("batch_buckets: sizes must be positive")
        if any(b > self.max_batch_size for b in self.batch_buckets):
            raise ValueError(
                f"batch_buckets: no bucket may exceed max_batch_size={self.max_batch_size}"
            )
        return self

    def buckets(self) -> tuple[int, ...]:
        """Batch shapes the engine prepares: the configured ones (or powers of two), always
        ending with ``max_batch_size`` so every batch fits one."""
        chosen = set(self.batch_buckets)
        if not chosen:
            b = 1
            while b < self.max_batch_size:
                chosen.add(b)
                b *= 2
        chosen.add(self.max_batch_size)
        return tuple(sorted(chosen))

    def preprocess_workers(self) -> int:
        # Each worker process has its own GIL; two threads let one decode while the other
        # waits for the decode-memory budget or a slow header.
        return self.preprocess_threads or 2

    def worker_count(self) -> int:
        """Ingress processes: the configured number, or one per usable core but one (the
        engine's), yet two on two cores: there two workers beat one from 64 concurrent clients
        up and cost no throughput below (bench/results/frontend.json)."""
        cores = available_cores()
        return self.workers or min(cores, max(2, cores - 1))

    def inflight_body_bytes(self) -> int:
        return self.max_inflight_body_mb * 2**20 or max(256 * 2**20, 2 * self.max_body_bytes)

    def engine_config(self) -> EngineConfig:
        """What the engine process needs of these settings (it never sees the rest)."""
        from service.engine.config import EngineConfig

        return EngineConfig(
            model_dir=self.model_dir,
            provider=self.provider,
            graph=self.graph,
            opt_level=self.opt_level,
            device_id=self.device_id,
            batch_buckets=self.buckets(),
            intra_op_threads=self.intra_op_threads,
            cpu_cores=available_cores(),
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
            cuda_tf32=self.cuda_tf32,
            precision=self.precision,
            cuda_graphs=self.cuda_graphs,
            cuda_layout=self.cuda_layout,
        )


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(
    overrides: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None,
) -> Settings:
    """Environment plus ``overrides`` (which win). ``flags`` maps a field to the flag that set
    it, so an error names what the user actually typed. Raises :class:`SettingsError`."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc:  # a cross-field rule: its message starts with the field it is about
            field, _, rest = msg.partition(": ")
            loc, msg = [field], rest or msg
        field = loc[0]
        source = (flags or {}).get(field) or env_name(field)
        raw = overrides.get(field, os.environ.get(env_name(field)))
        shown = "" if raw is None or field == "api_key" else f"={raw}"
        raise SettingsError(f"{source}{shown}: {msg}") from None
