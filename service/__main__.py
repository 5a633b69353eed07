"""``python -m service``: load the model, then serve it with uvicorn (one process; batching
is in-process). SIGTERM or Ctrl-C drains: in-flight and queued requests are answered first."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from service import logs
from service.app import create_app
from service.engine import Engine, EngineError
from service.settings import Settings, SettingsError, env_name, load_settings

log = logging.getLogger("service")

DESCRIPTION = """\
Serve an SE-ResNet model folder over HTTP: POST /classify returns the top-k classes of each
image. ONNX Runtime runs it on CUDA when a GPU is usable, else on the CPU, with the fused SE
graph when the op library covers the provider; concurrent requests are batched.

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
/metrics (Prometheus), /docs (OpenAPI).
"""

# Secrets stay out of argv (visible in ps): only the environment sets them.
_ENV_ONLY = {"api_key"}


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return "models/fashion-seresnet"
    value = field.default
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "auto"
    return "unset" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    env_only = "\n".join(f"  {env_name(n):<28} {Settings.model_fields[n].description}"
                         for n in sorted(_ENV_ONLY))
    parser = argparse.ArgumentParser(
        prog="python -m service", description=DESCRIPTION,
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
        parser.add_argument(flag, dest=name, metavar=name.upper() if not literal else None,
                            choices=literal, default=None,
                            help=f"{field.description or name} [{env_name(name)}, "
                            f"default {_default(name)}]")
    return parser


class ServiceServer(uvicorn.Server):
    """uvicorn, plus: log the address really bound (``--port 0`` picks a free port), mark the
    service not ready as soon as a shutdown signal arrives, and flush the batcher when the
    shutdown starts (uvicorn then waits for in-flight requests, the lifespan drains the rest)."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None],
                 on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._on_shutdown = on_shutdown

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                log.info("listening", extra={"url": f"http://{shown}:{port}"})

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only set a flag here (no logging, no locks).
        self._on_exit_signal()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    flags = {k: "--" + k.replace("_", "-") for k in given}
    try:
        settings = load_settings(given, flags)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        engine = Engine.load(settings)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = create_app(settings, engine=engine)
    state = app.state.service

    def mark_draining() -> None:
        state.draining = True

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or 1, lifespan="on",
        server_header=False,
    )
    server = ServiceServer(config, mark_draining, state.begin_drain)

    def fatal(message: str) -> None:
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    if state.fatal:
        print(f"error: {state.fatal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
