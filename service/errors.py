"""One error shape for everything that ends as ``{"error": {"code", "message"}}``."""

from __future__ import annotations


class ServiceError(Exception):
    """``status`` is the HTTP status, ``code`` a stable machine-readable name, ``headers``
    extra response headers (e.g. Retry-After)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
