"""The chat server, assembled: an OpenAI-compatible HTTP API plus the web page and its endpoints.

* ``/v1/...`` (``openai_api.py``): what the official ``openai`` client speaks, streaming included.
* ``/`` and ``/api/...`` (``web.py``): the chat page; every reply and rating lands in SQLite.
* ``guard.py``: Host check, API key, same-origin + CSRF rules for the page, body limit.
* ``protocol.py``: OpenAI-shaped errors and request validation; ``backend.py``: the model behind it all.

Every request shares one model through the engine's continuous-batching scheduler; a client that goes
away mid-answer has its slot freed at once. Bad input never yields a 500: every error is a 4xx in
OpenAI's shape.
"""
from __future__ import annotations

import secrets

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.errors import GptlabError
from gptlab.serve import openai_api, web
from gptlab.serve.backend import Backend
from gptlab.serve.guard import GuardMiddleware, HostPolicy
from gptlab.serve.protocol import APIError, Limits, error_response
from gptlab.serve.store import Store
from gptlab.tokenizer.chat_template import has_chat_tokens

__all__ = ["Backend", "HostPolicy", "Limits", "create_app"]


def create_app(backend, *, api_key: str | None = None, store: Store | None = None,
               limits: Limits | None = None, hosts: HostPolicy | None = None,
               csrf_token: str | None = None) -> FastAPI:
    """The server around ``backend`` (see ``Backend``); ``store`` keeps the web page's history;
    ``hosts`` says which Host headers are answered (default: loopback names only)."""
    import gptlab.generate.engine  # noqa: F401  (imports torch: pay that at startup, not on a request)
    limits = limits or Limits()
    store = store if store is not None else Store(":memory:")   # history lasts while the server runs
    csrf_token = csrf_token or secrets.token_urlsafe(32)
    app = FastAPI(title="gptlab", version="1", description="OpenAI-compatible API and chat page for a gptlab model.")
    app.state.backend, app.state.store, app.state.limits = backend, store, limits
    app.state.csrf_token = csrf_token
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       csrf_token=csrf_token, hosts=hosts)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(GptlabError)
    async def _gptlab_error(request, exc: GptlabError):
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else None
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return error_response(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        # A bug or a failing disk, never the caller's input (that is validated above): still JSON.
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    app.include_router(openai_api.router(backend, limits))
    app.include_router(web.router(backend, store, limits))
    app.include_router(web.page_router(csrf_token))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_id, "context_size": backend.context_size,
                "max_batch": getattr(backend, "max_batch", None), "busy_slots": backend.busy_slots,
                "auth_required": bool(api_key), "max_tokens_limit": limits.max_tokens_limit,
                "chat": has_chat_tokens(backend.tok)}

    app.mount("/static", StaticFiles(directory=web.STATIC), name="static")
    return app
