"""The cluster dashboard a browser gets at `/`: one HTML page, a script and a stylesheet from
runtime/api/static/, served by the app itself (no build step, nothing fetched from elsewhere).

`Dashboard` is the app's outermost middleware. It answers only
    GET|HEAD /                  when the client asks for text/html (a browser); every other
                                client keeps Ollama's plain-text "Ollama is running"
    GET|HEAD /dashboard/FILE    the page's script and stylesheet
and passes everything else on. These files hold no data, so they need no API key: the page
asks for the key (or takes it from the URL fragment, `/#key=KEY`, which no request carries),
keeps it in sessionStorage and sends it as `Authorization: Bearer` to /exolaunch/stats and
the chat route, exactly like any other client. Its Content-Security-Policy allows nothing but
this origin.
"""

from __future__ import annotations

from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                 b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                 b"form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


def _files() -> dict[str, tuple[bytes, str]]:
    """URL path -> (bytes, content type), read once: the page never changes while serving."""
    out = {}
    for f in STATIC.iterdir():
        if f.suffix in TYPES:
            out[f"/dashboard/{f.name}"] = (f.read_bytes(), TYPES[f.suffix])
    out["/"] = out.pop("/dashboard/dashboard.html")
    return out


def wants_html(scope: Scope) -> bool:
    for k, v in scope.get("headers", ()):
        if k.lower() == b"accept":
            return b"text/html" in v.lower()
    return False


class Dashboard:
    def __init__(self, app: ASGIApp):
        self.app = app
        self.files = _files()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        hit = None
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            if path != "/" or wants_html(scope):
                hit = self.files.get(path)
        if hit is None:
            await self.app(scope, receive, send)
            return
        body, ctype = hit
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                                (b"vary", b"accept"), *HEADERS]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
