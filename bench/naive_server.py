"""The naive baseline the service is measured against: FastAPI + PyTorch eager, one image per
request, no batching, no ONNX Runtime — what a first working version usually looks like.

It decodes with the same preprocessing as the service (modelcard.preprocessing), so the
comparison is about serving, not about image decoding. Weights come from the model folder's
checkpoint when there is one (random otherwise: speed does not depend on them).

    python -m bench.naive_server --model-dir models/fashion-seresnet --port 8001
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, Query, UploadFile

from export.architectures import create_model
from modelcard.preprocessing import load_array
from modelcard.schema import read_card
from testkit.server import EMBEDDED_MODEL

log = logging.getLogger("naive")


def find_checkpoint(model_dir: Path, card_checkpoint: str | None) -> Path | None:
    candidates = [model_dir / "checkpoint.pt"]
    if card_checkpoint:
        candidates += [Path(card_checkpoint), model_dir / Path(card_checkpoint).name]
    return next((c for c in candidates if c.is_file()), None)


def build_model(model_dir: Path) -> tuple[torch.nn.Module, str]:
    card = read_card(model_dir)
    model = create_model(
        card.architecture,
        num_classes=card.num_classes,
        in_chans=card.input.channels,
        seed=0,
        init="random",
    )
    checkpoint = find_checkpoint(model_dir, card.provenance.checkpoint)
    weights = "random"
    if checkpoint is not None:
        from export.checkpoint import load_into, read_state_dict

        load_into(model, read_state_dict(checkpoint), card.architecture, str(checkpoint))
        weights = str(checkpoint)
    return model.eval(), weights


def create_app(model_dir: Path) -> FastAPI:
    card = read_card(model_dir)
    spec = card.input
    model, weights = build_model(model_dir)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    app = FastAPI(title="naive baseline")
    app.state.weights = weights

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/classify")
    def classify(
        images: Annotated[UploadFile, File()], top_k: Annotated[int, Query(ge=1)] = 5
    ) -> dict:
        data = images.file.read()
        try:
            arr = load_array(data, spec)
        except Exception as e:
            raise HTTPException(400, f"cannot decode: {e}") from None
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32))[None]
        if spec.dtype == "uint8":  # the card's pixels: normalise as training did
            x = (x / 255.0 - mean) / std
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)[0]
        scores, ids = probs.topk(min(top_k, card.num_classes))
        return {
            "model": card.name,
            "model_version": card.version,
            "results": [
                {
                    "filename": images.filename or "",
                    "predictions": [
                        {"label": card.labels[i], "class_id": int(i), "score": float(s)}
                        for s, i in zip(scores.tolist(), ids.tolist(), strict=True)
                    ],
                }
            ],
        }

    return app


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                # The same start-up line as the service, so one launcher serves both.
                print(f'{{"event": "listening", "url": "http://{host}:{port}"}}', flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.naive_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default: torch's own choice)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(args.model_dir)
    print(f'{{"event": "weights", "source": "{app.state.weights}"}}', flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, log_level="warning"
    )
    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
