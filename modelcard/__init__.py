"""The model folder's card and the image preprocessing it describes (shared, torch-free)."""

from modelcard.preprocessing import load_array, to_array
from modelcard.schema import (
    CARD_FILE,
    FP16_FUSED_FILE,
    FUSED_FILE,
    INT8_FUSED_FILE,
    UNFUSED_FILE,
    CardError,
    InputSpec,
    ModelCard,
    read_card,
)

__all__ = [
    "CARD_FILE",
    "FP16_FUSED_FILE",
    "FUSED_FILE",
    "INT8_FUSED_FILE",
    "UNFUSED_FILE",
    "CardError",
    "InputSpec",
    "ModelCard",
    "load_array",
    "read_card",
    "to_array",
]
