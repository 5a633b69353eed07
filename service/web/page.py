"""``GET /`` (the page) and ``GET /static/{name}`` (its script and styles, and the words of
the service's error codes, written from :data:`service.errors.CODES`)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException

from service.errors import CODES

STATIC_DIR = Path(__file__).resolve().parent / "static"
# "no-cache" still lets the browser keep a copy, but it revalidates (ETag) so that a service
# upgrade never runs an old script against a new API.
_CACHE = {"Cache-Control": "no-cache"}
# The page needs nothing from elsewhere, and this makes the browser refuse it if a later edit
# ever tries; images are shown from blob: URLs of the user's own files.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


def _assets() -> dict[str, Path]:
    """Every file of ``static/`` by name: a fixed table, so no request path ever reaches the
    file system."""
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.name != "index.html"}


_ASSETS = _assets()


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type=_TYPES[".html"],
        headers={**_CACHE, "Content-Security-Policy": _CSP},
    )


ERROR_WORDS_SCRIPT = "error-words.js"


def error_words_script() -> str:
    """The page's table of short words per error code (it shows them before the message)."""
    words = {code: entry.words for code, entry in CODES.items()}
    return f"const SERVICE_ERROR_WORDS = {json.dumps(words, indent=2)};\n"


_ERROR_WORDS_JS = error_words_script()


@router.get(f"/static/{ERROR_WORDS_SCRIPT}")
async def error_words() -> Response:
    return Response(_ERROR_WORDS_JS, media_type=_TYPES[".js"], headers=_CACHE)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    path = _ASSETS.get(name)
    if path is None:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(path, media_type=_TYPES.get(path.suffix), headers=_CACHE)
