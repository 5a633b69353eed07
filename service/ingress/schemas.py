"""The JSON shapes the HTTP API returns, with real examples for the OpenAPI page."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the statuses a route really returns."""
    return {s: {"model": ErrorResponse, "description": _ERROR_TEXT[s]} for s in statuses}


_ERROR_TEXT = {
    400: "no image, or a single image that is empty or corrupt",
    401: "missing or wrong API key",
    404: "no such model",
    408: "the request body did not arrive in time",
    413: "body, image, image count or decode memory over the limits",
    415: "unsupported content type or image format",
    422: "invalid parameter",
    503: "queue full, too many bytes in flight, engine restarting or not ready (Retry-After)",
    504: "deadline exceeded",
}
