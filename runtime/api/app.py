"""The HTTP app rank 0 serves: create_app(engine, api_key=...) -> FastAPI.

Routes
    GET|HEAD /health                 200 {"status": "ok"} while the process is up (no auth)
    GET|HEAD /ready                  200 {"status": "ready", "model": id} once every rank has
                                     loaded and the engine has not failed; else 503
                                     {"status": "loading"|"failed", "reason": "..."}
    POST /v1/chat/completions        OpenAI (runtime/api/openai.py)
    POST /v1/completions
    GET  /v1/models, /v1/models/{id}
    POST /v1/responses               OpenAI Responses (runtime/api/responses.py)
    POST /v1/messages, /v1/messages/count_tokens   Anthropic (runtime/api/anthropic.py)
    /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, GET|HEAD /
                                     Ollama (runtime/api/ollama.py; `/` needs the key too)

Auth: with api_key set, every route except /health needs `Authorization: Bearer KEY` (or
`x-api-key: KEY`); otherwise 401. Errors are OpenAI error objects (runtime/api/errors.py);
request validation failures are 400 (not FastAPI's 422) naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import anthropic as anthropic_dialect
from . import ollama as ollama_dialect
from . import openai as openai_dialect
from . import responses as responses_dialect
from .auth import APIKeyMiddleware
from .errors import install_error_handlers
from .generation import Serving


def readiness(engine: Any) -> tuple[bool, dict[str, Any]]:
    failed = getattr(engine, "failed", None)
    if failed:
        return False, {"status": "failed", "reason": str(failed)}
    if not getattr(engine, "ready", False):
        return False, {"status": "loading", "reason": "the model is still loading on the ranks"}
    return True, {"status": "ready", "model": str(engine.model_id)}


def create_app(engine: Any, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="exolaunch", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.serving = Serving(engine)
    install_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
    async def health():
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"], include_in_schema=False)
    async def ready(request: Request):
        ok, body = readiness(request.app.state.engine)
        return JSONResponse(body, status_code=200 if ok else 503)

    app.include_router(openai_dialect.router)
    app.include_router(responses_dialect.router)
    app.include_router(anthropic_dialect.router)
    app.include_router(ollama_dialect.router)

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
