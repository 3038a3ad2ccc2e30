"""Rank 0's HTTP API: one app, one thin adapter module per dialect over one shared core.

    app.py          create_app(engine, api_key=..., max_body_mb=...): health, readiness, auth,
                    body limit, error handlers, /openapi.json
    openai.py       OpenAI chat completions, completions, models
    responses.py    OpenAI Responses (/v1/responses)
    anthropic.py    Anthropic Messages (/v1/messages, count_tokens)
    ollama.py       Ollama's /api/chat and /api/generate (and its error shape under /api)
    ollama_models.py
                    Ollama's model names and routes: /api/tags, show, ps, version, `/`
    generation.py   the serving handle every dialect uses (model fields and names, readiness,
                    tokenization thread, submit n requests, merged events, cancel on disconnect
                    / failure); the engine only through the `Engine` protocol (runtime/requests.py)
    core.py         what the dialects do alike: sampling rules, grammar checks, split events,
                    logprob entries, the stream guard and the reply (stream or collected)
    limits.py       every bound a request meets (sampling values, stop strings, prompts x n,
                    prompt characters, body size, nesting), checked for every dialect at
                    Serving.submit and in the body models
    body.py         what a body must be before a dialect sees it: at most --max-body-mb (413),
                    JSON (content type; depth; no lone surrogates), the route classes
    tools.py        tool calling: validation, the model's call syntax, forcing grammars,
                    streaming parser and splitter, messages for the next turn
    prompt.py       chat template rendering, completion prompts, token bytes for logprobs
    sse.py          SSE framing and a response that cancels its work when the client leaves
    auth.py         bearer / x-api-key check (everything but /health)
    errors.py       APIError and the handlers (OpenAI error objects; per-prefix formats)
    server.py       uvicorn in a background thread: start_server()
    listen.py       the listening socket (the launcher's front door binds it too)

Decisions where the OpenAI spec is silent or this server differs:
- Readiness is GET/HEAD /ready (not /v1/ready); it needs the API key like every route but
  /health.
- Model names: the served id, "default", an empty/absent model, or any name whose last path
  component equals the id's or the model directory's (so "mlx-community/X", "X" and
  "/models/X" all mean X), or the id without its ":tag" ("demo-llama" serves "demo-llama:100m").
  Anything else is 404 model_not_found.
- Without max_tokens a request may generate up to the rest of the context window.
- n choices are n engine requests; with a seed, choice i uses seed+i (mod 2**63).
- top_p == 0 means greedy; top_k >= the vocabulary means off. presence/frequency penalties,
  logit_bias, min_p and repetition_penalty are applied on every rank (runtime/sampling.py);
  unknown fields are ignored.
- A full engine queue is a 429 with Retry-After (seconds) and retry-after-ms, in each
  dialect's error shape.
- A stream that fails after it started sends `data: {"error": {...}}` and ends without [DONE].
- A client that disconnects (streaming or not) cancels its engine requests.
"""

import importlib

# Loaded on first use (PEP 562): the launcher imports runtime.api.listen and the dialects'
# error shapes, and FastAPI's import (~0.8 s) is not on its way to starting the ranks.
_LAZY = {"create_app": ".app", "start_server": ".server", "APIServer": ".server",
         "DEFAULT_HOST": ".server", "DEFAULT_PORT": ".server"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
