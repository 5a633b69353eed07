"""The service's browser side: a page at ``/`` to try the model, and ``/docs`` / ``/redoc``
that render without internet access.

The page is plain HTML/CSS/JS from ``static/`` (no build step, no CDN) and talks to the service
only through its public HTTP API, like any other client. Wire both into an app with::

    app = FastAPI(..., docs_url=None, redoc_url=None)
    app.include_router(web.router)
    web.install_offline_docs(app)
"""

from service.web.docs import install_offline_docs
from service.web.page import router

__all__ = ["install_offline_docs", "router"]
