"""What the served model accepts and returns, in the protocol's terms, read off its card."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelcard.schema import ModelCard
from service.v2.tensors import NUMPY_DTYPES, datatype_of_card_dtype

# The input name under which metadata advertises encoded image files (BYTES [N]), so that a
# client reading the metadata learns of them; the model's own input name takes them too.
IMAGE_FILES_INPUT = "image_files"


@dataclass(frozen=True)
class Signature:
    """One image input ``[N, C, H, W]`` and one logits output ``[N, classes]``.

    A BYTES tensor ``[N]`` or ``[N, 1]`` of encoded image files, which the server decodes and
    preprocesses as the card says, is taken under :attr:`files_input` (advertised in the
    metadata) and under the model's input name alike; a request carries one or the other.
    """

    model_name: str
    model_version: str
    input_name: str
    input_datatype: str
    channels: int
    height: int
    width: int
    output_name: str
    labels: tuple[str, ...]

    @classmethod
    def from_card(cls, card: ModelCard) -> Signature:
        spec = card.input
        return cls(
            model_name=card.name,
            model_version=card.version,
            input_name=spec.tensor,
            input_datatype=datatype_of_card_dtype(spec.dtype),
            channels=spec.channels,
            height=spec.height,
            width=spec.width,
            output_name=card.output.logits,
            labels=tuple(card.labels),
        )

    @property
    def files_input(self) -> str:
        """The advertised name of the encoded-image input."""
        return IMAGE_FILES_INPUT

    def takes_input(self, name: str) -> bool:
        return name in (self.input_name, self.files_input)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def input_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.input_datatype]

    @property
    def num_classes(self) -> int:
        return len(self.labels)
