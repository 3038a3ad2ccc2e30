"""The HTTP app rank 0 serves: create_app(engine, api_key=..., max_body_mb=...) -> FastAPI.

Routes
    GET|HEAD /health                 200 {"status": "ok"} while the process is up (no auth)
    GET|HEAD /ready                  200 {"status": "ready", "model": id, "running": n, "waiting": m}
                                     once every rank has loaded and the engine has not failed;
                                     else 503
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
    GET  /openapi.json               the request bodies of every route (OpenAPI 3)
    GET  /metrics                    Prometheus text format, vLLM's names under exolaunch:
                                     (runtime/api/metrics.py)
    GET  /exolaunch/stats            the same numbers as JSON, per rank and recent requests
                                     (what the dashboard and `exolaunch top` poll; the front
                                     door's /exolaunch/status adds restarts)
    GET  / (Accept: text/html), /dashboard/*   the dashboard page (runtime/api/dashboard.py;
                                     static, no key needed: it asks for the key)

Auth: with api_key set, every route except /health needs `Authorization: Bearer KEY` (or
`x-api-key: KEY`); otherwise 401. Errors are OpenAI error objects (runtime/api/errors.py);
request validation failures are 400 (not FastAPI's 422) naming the field.

Bodies (runtime/api/body.py): larger than `max_body_mb` -> 413, before anything parses them;
not JSON, nested too deeply or holding a lone surrogate -> 400 (415 for a non-JSON
Content-Type outside Ollama's routes). Every bound on what a request may ask is
runtime/api/limits.py.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..requests import Engine
from . import anthropic as anthropic_dialect
from . import ollama as ollama_dialect
from . import ollama_models
from . import openai as openai_dialect
from . import responses as responses_dialect
from .auth import APIKeyMiddleware
from .body import BodyLimit
from .dashboard import Dashboard
from .errors import install_error_handlers
from .generation import Serving
from .limits import DEFAULT_MAX_BODY_MB
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RequestOrigin


def create_app(engine: Engine, *, api_key: str | None = None,
               max_body_mb: float = DEFAULT_MAX_BODY_MB) -> FastAPI:
    app = FastAPI(title="exolaunch", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
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
            running, waiting = serving.load()
            return {"status": status, "model": serving.model_id, "running": running, "waiting": waiting}
        return JSONResponse({"status": status, "reason": why}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request):
        # ~10-30 ms of text formatting: off the event loop, so streams keep flowing meanwhile
        body = await run_in_threadpool(Serving.of(request).metrics.render)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/exolaunch/stats", include_in_schema=False)
    async def status(request: Request):
        return Serving.of(request).metrics.status()

    app.include_router(openai_dialect.router)
    app.include_router(responses_dialect.router)
    app.include_router(anthropic_dialect.router)
    app.include_router(ollama_dialect.router)
    app.include_router(ollama_models.router)

    app.add_middleware(BodyLimit, max_bytes=int(max_body_mb * 1_000_000))
    if api_key:  # outermost: no body is read for a request without the key
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestOrigin)  # each request's dialect and arrival time, for metrics
    app.add_middleware(Dashboard)  # outermost: the page itself holds no data and needs no key
    return app
