"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a
real 2-rank cluster with an API key. The page loads without a console error and without
fetching anything from another origin, shows both ranks, and a chat message streams an answer
(the demo model's tokens are random, but they stream); a screenshot is saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
KEY = "dash-key/with+odd&chars"
CHROMIUM = os.environ.get("EXOLAUNCH_CHROMIUM", "/usr/bin/chromium")
NOTES_SHOT = Path("/work/notes/dashboard.png")  # where the coordinator looks, when that folder exists


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ServingCluster(MODEL, "--api-key", KEY, cache=tmp_path_factory.mktemp("models")) as c:
        c.root = c.base_url.removesuffix("/v1")
        yield c
        c.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package `chromium`; scripts/install.sh --dev)")
    with sync_api.sync_playwright() as p:
        # Debian's Chromium, never `playwright install`: nothing is downloaded.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def watch(page, origin: str) -> dict[str, list[str]]:
    """Console errors, page errors, and any request leaving the cluster's origin (aborted)."""
    seen: dict[str, list[str]] = {"console": [], "pageerror": [], "outside": []}
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["pageerror"].append(str(e)))

    def route(r):
        u = urlsplit(r.request.url)
        if u.scheme in ("data", "blob") or f"{u.scheme}://{u.netloc}" == origin:
            return r.continue_()
        seen["outside"].append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    return seen


def test_root_is_html_for_browsers_and_text_for_the_rest(cluster):
    with httpx.Client(base_url=cluster.root, timeout=30) as h:
        page = h.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "<script src=\"/dashboard/dashboard.js\"" in page.text and "http" not in page.text.split("<body>")[1]
        assert h.get("/dashboard/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert h.get("/dashboard/nope.js").status_code in (401, 404)  # not a dashboard file: the API's answer
        # Everything else at / keeps Ollama's answer (and needs the key, as before).
        assert h.get("/").status_code == 401
        assert h.get("/", headers={"Authorization": f"Bearer {KEY}"}).text == "Ollama is running"


def test_dashboard_shows_both_ranks_and_streams_a_chat(cluster, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch(page, cluster.root)
    page.goto(f"{cluster.root}/#key={quote(KEY, safe='')}")  # the fragment never leaves the browser
    page.wait_for_function("() => document.querySelectorAll('#ranks tr.rank').length === 2", timeout=30_000)
    assert page.evaluate("() => location.hash") == ""  # the key left the address bar...
    assert page.evaluate("() => sessionStorage.getItem('exolaunch-api-key')") == KEY  # ...for this tab's storage
    rows = page.locator("#ranks tr.rank")
    assert [rows.nth(i).get_attribute("data-rank") for i in range(2)] == ["0", "1"]
    for i in range(2):
        assert "up" in rows.nth(i).inner_text()
    assert page.locator("#ranksup").inner_text() == "2 / 2"
    assert page.locator("#state").inner_text() == "ready"
    assert "TP 1/2" in rows.nth(0).inner_text()

    page.fill("#chat-input", "Tell me about the cluster")
    page.click("#chat-send")
    # Streaming: the answer has text while it is still coming...
    page.wait_for_function("""() => { const m = document.querySelector('.msg.assistant');
        return m && m.dataset.state === 'streaming' && m.querySelector('.text').textContent.length > 0; }""",
                           timeout=60_000, polling=20)
    # The numbers move: tok/s comes from the counters between two polls, so it shows the stream
    # even when a fast model has finished before the next poll (then `running` is back to 0).
    page.wait_for_function("() => parseFloat(document.getElementById('toks').textContent) > 0", timeout=60_000)
    busy = tmp_path / "dashboard.png"
    page.screenshot(path=str(busy), full_page=True)
    assert busy.stat().st_size > 10_000
    if NOTES_SHOT.parent.is_dir():
        shutil.copy(busy, NOTES_SHOT)
    # ...and then it ends.
    page.wait_for_function("() => document.querySelector('.msg.assistant').dataset.state === 'done'", timeout=120_000)
    answer = page.locator(".msg.assistant .text").inner_text()
    assert answer.strip() and "[error" not in answer
    # The request shows up in the recent list and in the counters.
    page.wait_for_function("() => document.querySelectorAll('#recent tbody tr').length >= 1", timeout=10_000)
    assert "openai" in page.locator("#recent tbody tr").first.inner_text()
    page.wait_for_timeout(1500)  # one more poll so tok/s and step times have two samples

    page.screenshot(path=str(tmp_path / "dashboard-done.png"), full_page=True)
    assert seen == {"console": [], "pageerror": [], "outside": []}, seen
    page.close()


def test_dashboard_asks_for_the_key(cluster, browser):
    page = browser.new_page()
    page.goto(cluster.root + "/")
    page.wait_for_selector("#keyform:not([hidden])", timeout=15_000)
    assert page.locator("#ranks tr.rank").count() == 0  # nothing shown without the key
    page.fill("#key", "wrong")
    page.click("#keyform button")
    page.wait_for_function("() => document.getElementById('keyerror').textContent.includes('refused')", timeout=15_000)
    page.fill("#key", KEY)
    page.click("#keyform button")
    page.wait_for_function("() => document.querySelectorAll('#ranks tr.rank').length === 2", timeout=15_000)
    assert page.locator("#keyform").is_hidden()
    page.close()
