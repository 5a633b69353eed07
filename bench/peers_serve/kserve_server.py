"""The KServe model server (``kserve.ModelServer``) with the peer model, on its v1 protocol:
``POST /v1/models/NAME:predict`` with ``{"instances": [{"b64": "<JPEG>"}]}``, KServe's
documented form for images. KServe's Python server has no batcher of its own (batching is
its agent's, a sidecar outside it), so every request is one model run.

    PEER_MODEL_DIR=... python -m bench.peers_serve.kserve_server --http_port 8081 --workers 2
"""

from __future__ import annotations

import base64

import kserve

from bench.peers_serve.model import Classifier


class Peer(kserve.Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.classifier: Classifier | None = None

    def load(self) -> bool:
        # The session is made in each worker on first use: with --workers > 1 KServe pickles
        # the model into its worker processes, and an ONNX Runtime session does not pickle.
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict | None = None) -> dict:  # type: ignore[override]
        if self.classifier is None:
            self.classifier = Classifier()
        images = [base64.b64decode(i["b64"]) for i in payload["instances"]]
        return {"predictions": self.classifier.top1(images)}


if __name__ == "__main__":
    args, _ = kserve.model_server.parser.parse_known_args()
    model = Peer(args.model_name or "peer")
    model.load()
    kserve.ModelServer().start([model])
