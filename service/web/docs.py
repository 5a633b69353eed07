"""Swagger UI at ``/docs`` and ReDoc at ``/redoc`` from assets shipped by the ``fastapi-offline``
package, so both render on an air-gapped machine (FastAPI's defaults load them from a CDN)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

# The package's data folder (swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js,
# favicon.png); we only use its files, not its FastAPI factory, because the app is built
# elsewhere.
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS_URL = "/static/docs"
# Both pages may load only from this service. ReDoc always shows a "by Redocly" logo from its
# CDN (no option turns it off): the browser now refuses that request and ReDoc hides the image.
# Inline scripts and styles stay allowed: FastAPI's Swagger page starts with one, and both UIs
# inject styles at run time.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
    "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
)


def install_offline_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add ``docs_url`` and ``redoc_url`` to ``app`` (built with ``docs_url=None,
    redoc_url=None``), served entirely by the app itself."""
    if app.openapi_url is None:
        raise ValueError("the app has no OpenAPI schema (openapi_url=None) to document")
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError(
            "build the app with docs_url=None, redoc_url=None: its CDN pages would shadow these"
        )
    openapi_url = app.openapi_url
    oauth2_url = app.swagger_ui_oauth2_redirect_url
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def base(request: Request) -> str:
        # Behind a proxy that mounts the service under a prefix, every URL needs it.
        return str(request.scope.get("root_path", "")).rstrip("/")

    def confined(page: HTMLResponse) -> HTMLResponse:
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = base(request)
        return confined(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - API",
                oauth2_redirect_url=root + oauth2_url if oauth2_url else None,
                swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                swagger_ui_parameters=app.swagger_ui_parameters,
            )
        )

    if oauth2_url:

        @app.get(oauth2_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = base(request)
        return confined(
            get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )
