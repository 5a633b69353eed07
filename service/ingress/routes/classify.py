"""``POST /classify``: the top-k classes of one or more images, a protocol adapter on the
worker's :class:`~service.ingress.pipeline.Pipeline`.

The body's multipart parts (or its one raw image) are read under the byte limits and the
deadline, the pipeline runs them, and the softmax of each image's logits is ranked; in a
multi-image request each image stands alone, a request of one bad image gets its status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from modelcard.schema import ModelCard
from service import ranking
from service.errors import ServiceError
from service.ingress.bodies import IMAGE_FIELD, Upload, read_uploads
from service.ingress.deps import PipelineDep
from service.ingress.pipeline import Files, Outcome, http_hangup
from service.ingress.schemas import AUTH, BODY, IMAGE, ClassifyResponse, error_responses

router = APIRouter(tags=["classification"])

# The query parameter, declared once: FastAPI documents it, the lane validates with it.
DEFAULT_TOP_K = 5
TopK = Annotated[int, Query(ge=1, description="predictions per image (clamped to the class count)")]

_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses=error_responses(
        *AUTH,
        *BODY,
        "invalid_multipart",
        "no_image",
        "too_many_images",
        "unsupported_media_type",
        *IMAGE,
        "invalid_parameter",
        "deadline_exceeded",
    ),
    summary="Classify one or more images (multipart parts named 'images', or a raw body)",
)
async def classify(
    request: Request, pipeline: PipelineDep, top_k: TopK = DEFAULT_TOP_K
) -> JSONResponse:
    # POST /classify reaches this through service.ingress.lane, which solves these arguments
    # itself; the declaration is the route's OpenAPI entry (and FastAPI's, for the rest).
    settings = pipeline.settings
    deadline = time.monotonic() + settings.request_timeout_s
    async with pipeline.accounted():
        pipeline.check_ready()

        async def parse(chunks: AsyncIterator[bytes]) -> list[Upload]:
            return await read_uploads(
                request.headers, chunks, settings.max_body_bytes, settings.max_images_per_request
            )

        body = await pipeline.read_body(request, deadline, parse)
        uploads = body.value
        request.state.images = len(uploads)
        outcome = await pipeline.run(
            Files([u.data for u in uploads]),
            deadline,
            held=body,
            hangup=http_hangup(request.receive),
        )
        if len(uploads) == 1 and (err := outcome.errors[0]) is not None:
            raise ServiceError(err.status, err.code, f"{uploads[0].filename}: {err.message}")
        pipeline.answered(outcome)
    return JSONResponse(answer(pipeline.card, uploads, outcome, top_k))


def answer(card: ModelCard, uploads: Sequence[Upload], outcome: Outcome, k: int) -> dict[str, Any]:
    """The JSON of docs/design.md §5: per image its predictions or its error, in order."""
    ids, probs = ranking.top_k(ranking.softmax(outcome.logits[outcome.good]), k)
    rows = iter(zip(ids.tolist(), probs.tolist(), strict=True))
    results: list[dict[str, Any]] = []
    for upload, err in zip(uploads, outcome.errors, strict=True):
        if err is not None:
            results.append(
                {"filename": upload.filename, "error": {"code": err.code, "message": err.message}}
            )
            continue
        row_ids, row_probs = next(rows)
        predictions = [
            {"label": card.labels[c], "class_id": c, "score": p}
            for c, p in zip(row_ids, row_probs, strict=True)
        ]
        results.append({"filename": upload.filename, "predictions": predictions})
    return {"model": card.name, "model_version": card.version, "results": results}
