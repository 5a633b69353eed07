"""MLServer's custom runtime with the peer model: the Open Inference Protocol over REST, one
BYTES input holding the base64 JPEG (``parameters.content_type: base64``, MLServer's codec
for binary data in JSON), one INT64 output with the top-1 class. MLServer's adaptive batching
(``max_batch_size``, ``max_batch_time`` in model-settings.json) merges concurrent requests
along the first axis before ``predict`` and splits the answer back.

bench.peers writes the settings and starts ``mlserver start FOLDER``.
"""

from __future__ import annotations

import base64

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from bench.peers_serve.model import Classifier


def _image(item: str | bytes) -> bytes:
    return base64.b64decode(item)


class Peer(MLModel):
    async def load(self) -> bool:
        self.classifier = Classifier()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = [_image(item) for item in payload.inputs[0].data.root]
        top1 = self.classifier.top1(images)
        output = ResponseOutput(name="top1", shape=[len(top1), 1], datatype="INT64", data=top1)
        return InferenceResponse(model_name=self.name, outputs=[output])
