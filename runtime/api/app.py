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
    /api/chat, /api/generate         Ollama (runtime/api/ollama.py)
    /api/tags, /api/show, /api/ps, /api/version, GET|HEAD /
                                     Ollama's model routes (runtime/api/ollama_models.py; `/`
                                     needs the key too)

Auth: with api_key set, every route except /health needs `Authorization: Bearer KEY` (or
`x-api-key: KEY`); otherwise 401. Errors are OpenAI error objects (runtime/api/errors.py);
request validation failures are 400 (not FastAPI's 422) naming the field.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..requests import Engine
from . import anthropic as anthropic_dialect
from . import ollama as ollama_dialect
from . import ollama_models
from . import openai as openai_dialect
from . import responses as responses_dialect
from .auth import APIKeyMiddleware
from .errors import install_error_handlers
from .generation import Serving


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="exolaunch", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = Serving(engine)
    install_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
    async def health():
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"], include_in_schema=False)
    async def ready(request: Request):
        serving = Serving.of(request)
        status, why = serving.state()
        if status == "ready":
            return {"status": status, "model": serving.model_id}
        return JSONResponse({"status": status, "reason": why}, status_code=503)

    app.include_router(openai_dialect.router)
    app.include_router(responses_dialect.router)
    app.include_router(anthropic_dialect.router)
    app.include_router(ollama_dialect.router)
    app.include_router(ollama_models.router)

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
