"""TorchServe handler with the peer model: ``POST /predictions/NAME`` with the JPEG as the
body; TorchServe's own batcher (batch_size, max_batch_delay in the model's registration)
hands ``handle`` a list of requests, run as one batch."""

from __future__ import annotations

import os
import sys

# TorchServe loads this file by path; the repository (for bench.peers_serve and modelcard)
# comes from the environment bench.peers starts it with.
sys.path.insert(0, os.environ["PEER_REPO"])

from bench.peers_serve.model import Classifier


class Handler:
    def __init__(self) -> None:
        self.classifier: Classifier | None = None

    def initialize(self, context: object) -> None:
        self.classifier = Classifier()

    def handle(self, data: list[dict], context: object) -> list[int]:
        assert self.classifier is not None
        images = [bytes(row.get("data") or row.get("body")) for row in data]
        return self.classifier.top1(images)


_service = Handler()


def handle(data: list[dict] | None, context: object) -> list[int] | None:
    if not _service.classifier:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
