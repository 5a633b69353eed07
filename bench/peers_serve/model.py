"""The model every peer serves: ``PEER_MODEL_DIR``'s card, the graph file ``PEER_MODEL_FILE``
(the one the service runs), the SE op library ``PEER_OPS_LIBRARY`` when the graph has fused SE
nodes, and the card's preprocessing of encoded image bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelcard.preprocessing import load_array
from modelcard.schema import read_card


class Classifier:
    def __init__(self) -> None:
        folder = Path(os.environ["PEER_MODEL_DIR"])
        self.card = read_card(folder)
        options = ort.SessionOptions()
        library = os.environ.get("PEER_OPS_LIBRARY")
        if library:
            options.register_custom_ops_library(library)
        graph = folder / os.environ.get("PEER_MODEL_FILE", "model.onnx")
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.input = self.card.input.tensor
        self.output = self.card.output.logits

    def arrays(self, images: Sequence[bytes]) -> list[np.ndarray]:
        return [load_array(data, self.card.input) for data in images]

    def run(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run([self.output], {self.input: np.stack(arrays)})
        return np.asarray(logits)

    def top1(self, images: Sequence[bytes]) -> list[int]:
        """One class index per image (the peers answer only that: the comparison is of
        serving, not of response formatting)."""
        return [int(i) for i in self.run(self.arrays(images)).argmax(axis=1)]
