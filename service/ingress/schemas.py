"""The JSON shapes the HTTP API returns, with real examples for the OpenAPI page."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.errors import CODES


class Prediction(BaseModel):
    label: str = Field(examples=["Ankle boot"])
    class_id: int = Field(examples=[9])
    score: float = Field(description="softmax probability", examples=[0.9987])


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code", examples=["corrupt_image"])
    message: str = Field(examples=["PNG data cannot be decoded: image file is truncated"])


class ImageResult(BaseModel):
    filename: str = Field(examples=["boot.png"])
    predictions: list[Prediction] | None = Field(None, description="descending by score")
    error: ErrorDetail | None = Field(None, description="set instead of predictions")


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["fashion-seresnet"])
    model_version: str = Field(examples=["1"])
    results: list[ImageResult] = Field(description="one per image, in request order")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "model": "fashion-seresnet",
                    "model_version": "1",
                    "results": [
                        {
                            "filename": "boot.png",
                            "predictions": [
                                {"label": "Ankle boot", "class_id": 9, "score": 0.9987},
                                {"label": "Sneaker", "class_id": 7, "score": 0.0011},
                            ],
                        },
                        {
                            "filename": "notes.txt",
                            "error": {
                                "code": "unsupported_format",
                                "message": "not a supported image "
                                "(accepted: JPEG, PNG, WEBP, BMP, GIF, TIFF; "
                                "first bytes b'hello wo')",
                            },
                        },
                    ],
                }
            ]
        }
    }


class ErrorResponse(BaseModel):
    error: ErrorDetail

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "error": {
                        "code": "queue_full",
                        "message": (
                            "1024 images in progress; 1 more exceed SERESNET_MAX_QUEUE_SIZE=1024"
                        ),
                    }
                }
            ]
        }
    }


class Live(BaseModel):
    live: bool = True


class Ready(BaseModel):
    ready: bool = True


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str = Field(examples=["seresnet-serve"])
    version: str = Field(examples=["0.2.0"])
    extensions: list[str] = Field(default_factory=list)


class ModelIndexEntry(BaseModel):
    name: str
    versions: list[str]


class ModelIndex(BaseModel):
    models: list[ModelIndexEntry]


class ModelMetadata(BaseModel):
    """KServe V2 model metadata, plus the card and how the model is run."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    ready: bool
    engine: dict[str, Any] = Field(description="provider, graph, reasons, buckets, TF32...")
    processes: dict[str, Any] = Field(description="ingress workers and the engine process")
    batching: dict[str, Any]
    limits: dict[str, Any]
    card: dict[str, Any]


class V2ErrorResponse(BaseModel):
    """The Open Inference Protocol's error body, answered on every ``/v2`` route."""

    error: str = Field(examples=["unknown model 'resnet'; this server serves 'fashion-seresnet'"])


# The codes a route may answer, in groups that recur.
BUSY = ("busy", "queue_full", "not_ready", "engine_unavailable", "shutting_down")
NOT_READY = ("not_ready",)
AUTH = ("unauthorized",)
BODY = ("invalid_request", "request_timeout", "body_too_large", *BUSY)
IMAGE = ("empty_image", "corrupt_image", "image_too_large", "unsupported_format")


def error_responses(*codes: str, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the codes a route really answers: per status, the words of
    its codes (:data:`service.errors.CODES`), and the body shape of the route's path."""
    by_status: dict[int, dict[str, list[str]]] = {}
    for code in dict.fromkeys(codes):
        entry = CODES[code]
        by_status.setdefault(entry.status, {}).setdefault(entry.words, []).append(code)
    model = V2ErrorResponse if v2 else ErrorResponse
    return {
        status: {
            "model": model,
            "description": "; ".join(
                f"{words} ({', '.join(names)})" for words, names in groups.items()
            ),
        }
        for status, groups in sorted(by_status.items())
    }
