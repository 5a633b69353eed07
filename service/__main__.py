"""``python -m service``: check the settings, then run the supervisor (:mod:`service.supervisor`):
one engine process and N ingress workers. SIGTERM or Ctrl-C drains: in-flight and queued
requests are answered first."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service import logs, supervisor
from service.settings import DEFAULT_MODEL, Settings, SettingsError, env_name, load_settings

log = logging.getLogger("service")

DESCRIPTION = """\
Serve an SE-ResNet model folder over HTTP: POST /classify returns the top-k classes of each
image; a page to try it is at / and the API docs at /docs. ONNX Runtime runs the model on CUDA
when a GPU is usable, else on the CPU, with the fused SE graph when the op library covers the
provider.

Processes: N ingress workers (--workers) take HTTP, check limits, decode and preprocess images
into shared memory; one engine process batches every worker's images and runs the model. A
worker that dies is replaced; an engine that dies is restarted (503 meanwhile).

Every option can also be set with an environment variable (SERESNET_<OPTION>, listed below);
a flag overrides its variable. A bad value stops start-up with one line naming it.
"""

EXAMPLES = """\
examples:
  python -m service                                  # models/fashion-seresnet on 127.0.0.1:8000
  python -m service --host 0.0.0.0 --port 8080 --model-dir models/my-model
  SERESNET_PROVIDER=cpu SERESNET_MAX_BATCH_SIZE=16 python -m service
  SERESNET_API_KEY=s3cret python -m service          # then: Authorization: Bearer s3cret

  curl -F images=@shoe.jpg -F images=@shirt.png 'http://127.0.0.1:8000/classify?top_k=3'
  curl --data-binary @shoe.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/classify

endpoints: POST /classify, GET /v2/health/live, /v2/health/ready, /v2/models/{name},
/metrics (Prometheus, all processes), / (try it in a browser), /docs (OpenAPI, offline).
gRPC: the Open Inference Protocol (inference.GRPCInferenceService, as tritonclient.grpc
calls it) on --grpc-port, 8001 (0 turns it off).
"""

# Secrets stay out of argv (visible in ps): only the environment sets them.
_ENV_ONLY = {"api_key"}


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return str(DEFAULT_MODEL)
    value = field.default
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "auto"
    return "unset" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    env_only = "\n".join(
        f"  {env_name(n):<28} {Settings.model_fields[n].description}" for n in sorted(_ENV_ONLY)
    )
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=DESCRIPTION,
        epilog=f"environment only:\n{env_only}\n  SERESNET_OPS_LIBRARY         path of the "
        f"op library (default: found beside the ops package)\n\n{EXAMPLES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        if name in _ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        choices = getattr(field.annotation, "__args__", None)
        literal = choices if choices and all(isinstance(c, str) for c in choices) else None
        parser.add_argument(
            flag,
            dest=name,
            metavar=name.upper() if not literal else None,
            choices=literal,
            default=None,
            help=f"{field.description or name} [{env_name(name)}, default {_default(name)}]",
        )
    return parser


def export_to_environment(given: dict[str, object]) -> None:
    """Flags reach the worker and engine processes through the environment they inherit."""
    for name, value in given.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)
        os.environ[env_name(name)] = text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    flags = {k: "--" + k.replace("_", "-") for k in given}
    try:
        settings = load_settings(given, flags)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_to_environment(given)
    logs.configure(settings.log_level, settings.log_format, process="supervisor")
    return supervisor.serve(settings)


if __name__ == "__main__":
    sys.exit(main())
