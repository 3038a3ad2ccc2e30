"""`exolaunch batch`: OpenAI batch files through the cluster, resumable through the journal.

Fast tests: parsing and validation, the journal, and the CLI against a real HTTP server in this
process (retry rules, auth, defaults) or against nothing at all (a dead port). Slow tests run a
real 2-rank cluster: a mixed batch end to end, Ctrl-C / SIGKILL / resume with nothing lost or
duplicated, and --url against a running `exolaunch run` with an API key.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from launcher.batch.inputfile import parse_input
from launcher.batch.journal import Journal
from launcher.errors import ConfigError
from launcher.ports import free_data_port
from tests.launch_helpers import (ServingCluster, assert_no_leftovers, env_for_tests, free_port, run, start,
                                  token)

MODEL = "demo-llama:tiny"


# -- helpers ------------------------------------------------------------------------------------

def chat(cid: str, content: str | None = None, max_tokens: int = 8, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content or cid}], "max_tokens": max_tokens,
                     "ignore_eos": True, **body}}


def completion(cid: str, prompt: str | None = None, max_tokens: int = 8, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt or cid, "max_tokens": max_tokens, "ignore_eos": True, **body}}


def write_jsonl(path: Path, items: list) -> Path:
    """dicts become JSON lines, strings are written verbatim (for malformed lines)."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in items))
    return path


def read_output(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [x["custom_id"] for x in lines]
    assert len(ids) == len(set(ids)), f"a custom_id appears more than once in the output: {ids}"
    for x in lines:
        assert x["id"].startswith("batch_req_") and set(x) == {"id", "custom_id", "response", "error"}
    return {x["custom_id"]: x for x in lines}


def journal_rows(path: Path) -> dict[str, tuple[str, str | None, int]]:
    """custom_id -> (state, result, attempts), read-only while a batch may be writing."""
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return {cid: (state, result, attempts) for cid, state, result, attempts in
                db.execute("SELECT custom_id, state, result, attempts FROM requests")}
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        db.close()


def n_ok(path: Path) -> int:
    return sum(1 for state, _, _ in journal_rows(path).values() if state == "ok")


def token_procs(tok: str) -> list[int]:
    """Processes carrying EXOLAUNCH_TEST_TOKEN=tok in their environment: the `exolaunch run` child,
    agents and ranks (forwarded with -x), whatever their command lines say."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get("EXOLAUNCH_TEST_TOKEN") == tok:
                found.append(p.info["pid"])
        except (psutil.Error, OSError):
            continue
    return found


def wait_no_token_procs(tok: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while token_procs(tok) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = token_procs(tok)
    assert not left, f"processes left behind: {[psutil.Process(p).cmdline() for p in left if psutil.pid_exists(p)]}"
    assert_no_leftovers(tok)


def cluster_args(tok: str) -> list[str]:
    return ["-n", "2", "--data-port", str(free_data_port(2)), "-x", "EXOLAUNCH_CACHE", "-x",
            f"EXOLAUNCH_TEST_TOKEN={tok}"]


# -- parsing and validation ----------------------------------------------------------------------

def test_parse_reports_malformed_lines_and_keeps_the_good_ones(tmp_path):
    good_model = completion("p-own-model")
    good_model["body"]["model"] = "other-model"
    path = write_jsonl(tmp_path / "requests.jsonl", [
        chat("c1"),                                                              # 1
        "",                                                                      # 2 blank: skipped
        '{"custom_id": "x", "method": "POST",',                                  # 3 bad JSON
        completion("p4"),                                                        # 4
        "[1, 2]",                                                                # 5 not an object
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},   # 6 no custom_id
        {**completion("ignored"), "custom_id": "  "},                            # 7 empty custom_id
        {**completion("m8"), "method": "GET"},                                   # 8 wrong method
        {**completion("u9"), "url": "/v1/embeddings"},                           # 9 wrong url
        {**completion("b10"), "body": "prompt=x"},                               # 10 body not an object
        completion("c1"),                                                        # 11 duplicate of line 1
        good_model,                                                              # 12
        {**completion("ignored"), "custom_id": 13},                              # 13 custom_id not a string
        "   ",                                                                   # 14 blank: skipped
        {"custom_id": "nomsg", "method": "POST", "url": "/v1/chat/completions", "body": {}},  # 15
    ])
    inp = parse_input(path, MODEL)

    assert [r.line for r in inp.requests] == [1, 4, 12]
    assert [r.custom_id for r in inp.requests] == ["c1", "p4", "p-own-model"]
    assert inp.requests[1].body["model"] == MODEL and inp.requests[1].url == "/v1/completions"
    assert inp.requests[2].body["model"] == "other-model"
    bad = {m.line: m for m in inp.malformed}
    assert sorted(bad) == [3, 5, 6, 7, 8, 9, 10, 11, 13, 15]
    for n, m in bad.items():
        assert m.message.startswith(f"{path}:{n}: ") and "Fix:" in m.message, m.message
    assert "not valid JSON" in bad[3].message
    assert "expected a JSON object, got an array" in bad[5].message
    assert "custom_id: missing" in bad[6].message
    assert "custom_id: empty" in bad[7].message
    assert 'method: "GET"' in bad[8].message
    assert 'url: "/v1/embeddings"' in bad[9].message
    assert "body: expected a JSON object, got a string" in bad[10].message
    assert "also used on line 1" in bad[11].message
    assert "custom_id: expected a string" in bad[13].message
    assert "body.messages" in bad[15].message
    # Readable ids get an error line in the output; a duplicate's id already has its line.
    assert {n: m.custom_id for n, m in bad.items() if m.custom_id} == {8: "m8", 9: "u9", 10: "b10", 15: "nomsg"}


def test_missing_input_is_one_clear_error_and_starts_nothing(tmp_path):
    out = tmp_path / "results.jsonl"
    r = run("batch", MODEL, "--input", str(tmp_path / "nope.jsonl"), "--output", str(out), timeout=60)
    assert r.returncode == 2, r.stderr
    missing = tmp_path / "nope.jsonl"
    assert r.stderr.strip() == f"exolaunch: error: --input {missing}: no such file. Fix: check the path."
    assert not out.exists() and not Path(f"{out}.journal").exists()


# -- the journal ---------------------------------------------------------------------------------

def test_journal_resumes_keeps_ok_answers_and_refuses_another_input(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b"), {**chat("m"), "method": "PUT"}])
    jpath = tmp_path / "j.sqlite"
    inp = parse_input(path, MODEL)
    j = Journal.open(jpath, inp, MODEL)
    assert j.already_ok == 0 and j.states() == {"a": "pending", "b": "pending", "m": "malformed"}
    with pytest.raises(ConfigError, match="in use by another exolaunch batch"):
        Journal.open(jpath, inp, MODEL)
    j.record("a", True, {"custom_id": "a", "answer": 1}, attempts=1, prompt_tokens=3, completion_tokens=8)
    j.record("b", False, {"custom_id": "b", "error": "x"}, attempts=3)
    j.close()

    j = Journal.open(jpath, parse_input(path, MODEL), MODEL)
    assert j.already_ok == 1 and j.states() == {"a": "ok", "b": "failed", "m": "malformed"}
    j.record("a", False, {"custom_id": "a", "answer": "overwritten?"}, attempts=1)  # ok is final
    assert [json.loads(x)["custom_id"] for x in j.answered_lines()] == ["a", "b", "m"]
    assert json.loads(next(j.answered_lines()))["answer"] == 1
    j.close()
    with pytest.raises(ConfigError, match="was made for model 'demo-llama:tiny', not 'other'.*--restart"):
        Journal.open(jpath, parse_input(path, "other"), "other")

    write_jsonl(path, [chat("a"), chat("b"), chat("c")])
    with pytest.raises(ConfigError) as e:
        Journal.open(jpath, parse_input(path, MODEL), MODEL)
    msg = str(e.value)
    assert str(jpath) in msg and str(path) in msg and "--restart" in msg and "has changed" in msg
    j = Journal.open(jpath, parse_input(path, MODEL), MODEL, restart=True)
    assert j.already_ok == 0 and j.states() == {"a": "pending", "b": "pending", "c": "pending"}
    j.close()

    (tmp_path / "notes.txt").write_text("not a database, and it must not be touched\n" * 100)
    with pytest.raises(ConfigError, match="not an exolaunch batch journal"):
        Journal.open(tmp_path / "notes.txt", parse_input(path, MODEL), MODEL, restart=True)
    assert (tmp_path / "notes.txt").read_text().startswith("not a database")


# -- the CLI against a real HTTP server in this process -------------------------------------------

class ScriptedServer:
    """An OpenAI-ish server whose answers per prompt follow a script: a list of statuses played
    in order (the last one repeats). 200 answers carry usage; "sleep" answers too late."""

    def __init__(self, script: dict[str, list]):
        self.script = script
        self.seen: list[tuple[str, dict, str | None]] = []   # (prompt, body, Authorization)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = body["messages"][0]["content"] if "messages" in body else body["prompt"]
                with outer.lock:
                    n = sum(1 for k, _, _ in outer.seen if k == key)
                    outer.seen.append((key, body, self.headers.get("Authorization")))
                plan = outer.script[key]
                step = plan[min(n, len(plan) - 1)]
                if step == "sleep":
                    time.sleep(1.5)
                    step = 200
                headers = {}
                if step == "engine_failed":
                    payload = {"error": {"message": "the inference engine failed: rank 1 stopped",
                                         "type": "service_unavailable_error", "param": None, "code": step}}
                    step = 503
                elif step == 200:
                    payload = {"id": f"cmpl-{key}-{n}", "object": "text_completion", "model": body["model"],
                               "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
                else:
                    payload = {"error": {"message": f"scripted {step}", "type": "x", "param": None,
                                         "code": f"scripted_{step}"}}
                    if step == 429:
                        headers["Retry-After"] = "0"
                data = json.dumps(payload).encode()
                try:
                    self.send_response(step)
                    for k, v in {**headers, "Content-Type": "application/json",
                                 "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, key: str) -> int:
        return sum(1 for k, _, _ in self.seen if k == key)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_retry_rules_auth_and_default_model_against_a_real_http_server(tmp_path):
    srv = ScriptedServer({"ok1": [200], "flaky": [503, 200], "limited": [429, 200], "bad": [400],
                          "broken": [500], "slow": ["sleep"]})
    try:
        own = chat("limited")
        own["body"]["model"] = "someone-else"
        inp = write_jsonl(tmp_path / "in.jsonl", [completion("ok1"), chat("flaky"), own, completion("bad"),
                                                  completion("broken"), completion("slow")])
        out = tmp_path / "out.jsonl"
        args = ("batch", MODEL, "--url", srv.url, "--api-key", "sekrit", "--max-retries", "2",
                "--request-timeout", "0.5", "-i", str(inp), "-o", str(out))
        t = time.monotonic()
        r = run(*args, timeout=60)
        took = time.monotonic() - t
        assert r.returncode == 1, r.stderr
        assert took < 20, f"took {took:.1f} s"
        res = read_output(out)
        assert list(res) == ["ok1", "flaky", "limited", "bad", "broken", "slow"]  # input order
        for cid in ("ok1", "flaky", "limited"):
            assert res[cid]["error"] is None and res[cid]["response"]["status_code"] == 200
            assert res[cid]["response"]["body"]["usage"]["completion_tokens"] == 5
        assert res["flaky"]["response"]["request_id"] == "cmpl-flaky-1"
        assert (srv.count("ok1"), srv.count("flaky"), srv.count("limited")) == (1, 2, 2)
        # 4xx is the request's own fault: final, not retried, the server's answer kept.
        assert srv.count("bad") == 1
        assert res["bad"]["response"]["status_code"] == 400 and res["bad"]["error"]["code"] == "scripted_400"
        # 5xx and timeouts: 1 + --max-retries attempts, then a failure naming them.
        assert srv.count("broken") == 3 and res["broken"]["response"]["status_code"] == 500
        assert "after 3 attempts" in res["broken"]["error"]["message"]
        assert srv.count("slow") == 3 and res["slow"]["response"] is None
        assert res["slow"]["error"]["code"] == "timeout"
        # Bodies without a model get MODEL; the key travels as a Bearer token.
        models = {k: b["model"] for k, b, _ in srv.seen}
        assert models == {"ok1": MODEL, "flaky": MODEL, "limited": "someone-else", "bad": MODEL,
                          "broken": MODEL, "slow": MODEL}
        assert {a for _, _, a in srv.seen} == {"Bearer sekrit"}
        assert "3 ok, 3 failed, 0 malformed, 0 already done" in r.stderr
        assert "Traceback" not in r.stderr

        # Rerun: what succeeded is not sent again, what failed is retried.
        srv.script["bad"] = srv.script["slow"] = [200]
        r = run(*args, timeout=60)
        assert r.returncode == 1, r.stderr  # broken still fails
        assert srv.count("ok1") == 1 and srv.count("flaky") == 2 and srv.count("bad") == 2
        assert srv.count("broken") == 6
        assert "2 ok, 1 failed, 0 malformed, 3 already done on a previous run" in r.stderr
        res2 = read_output(out)
        assert list(res2) == list(res)
        assert res2["bad"]["response"]["status_code"] == 200
        assert res2["ok1"] == res["ok1"]  # the very same line, from the journal
    finally:
        srv.close()


def test_engine_failure_stops_the_batch_and_leaves_the_rest_pending(tmp_path):
    srv = ScriptedServer({"a": [200], "dead": ["engine_failed"], "c": [200]})
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("dead"), chat("c")])
        out = tmp_path / "out.jsonl"
        r = run("batch", MODEL, "--url", srv.url, "--concurrency", "1", "-i", str(inp), "-o", str(out), timeout=60)
        assert r.returncode == 1, r.stderr
        assert "engine failed" in r.stderr and "2 requests not answered yet" in r.stderr
        assert srv.count("dead") == 1 and srv.count("c") == 0  # not retried, and nothing more sent
        assert list(read_output(out)) == ["a"]
        assert {cid: s for cid, (s, _, _) in journal_rows(Path(f"{out}.journal")).items()} == \
            {"a": "ok", "dead": "pending", "c": "pending"}
    finally:
        srv.close()


def test_url_server_down_fails_fast_with_errors_per_request(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [chat(f"c{i}") for i in range(6)] + ["{oops"])
    out = tmp_path / "out.jsonl"
    args = ("batch", MODEL, "--url", f"http://127.0.0.1:{free_port()}/v1", "--max-retries", "1",
            "-i", str(inp), "-o", str(out))
    t = time.monotonic()
    r = run(*args, timeout=60)
    assert time.monotonic() - t < 15
    assert r.returncode == 1, r.stderr
    res = read_output(out)
    assert sorted(res) == [f"c{i}" for i in range(6)]
    for x in res.values():
        assert x["response"] is None and x["error"]["code"] == "connection_error"
        assert "after 2 attempts" in x["error"]["message"]
    assert f"{inp}:7: not valid JSON" in r.stderr
    assert "0 ok, 6 failed, 1 malformed" in r.stderr and "(line 7)" in r.stderr
    assert "Traceback" not in r.stderr
    rows = journal_rows(Path(f"{out}.journal"))
    assert {state for state, _, _ in rows.values()} == {"failed"} and {a for _, _, a in rows.values()} == {2}

    # A rerun tries the failed ones again.
    r = run(*args, timeout=60)
    assert r.returncode == 1
    assert {a for _, _, a in journal_rows(Path(f"{out}.journal")).values()} == {4}


def test_changed_input_is_refused_until_restart(tmp_path):
    inp = write_jsonl(tmp_path / "requests.jsonl", [chat("a"), chat("b")])
    out = tmp_path / "results.jsonl"
    args = ("batch", MODEL, "--url", f"http://127.0.0.1:{free_port()}/v1", "--max-retries", "0",
            "-i", str(inp), "-o", str(out))
    assert run(*args, timeout=60).returncode == 1
    write_jsonl(inp, [chat("a"), chat("b"), chat("c")])
    r = run(*args, timeout=60)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith(f"exolaunch: error: journal {out}.journal was made from {inp}") and "--restart" in err
    assert len(err.splitlines()) == 1
    assert set(read_output(out)) == {"a", "b"}  # untouched
    r = run(*args, "--restart", timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"--restart: discarded the earlier journal {out}.journal" in r.stderr
    assert set(read_output(out)) == {"a", "b", "c"}


# -- a real cluster --------------------------------------------------------------------------------

@pytest.mark.slow
def test_mixed_batch_on_a_two_rank_cluster(tmp_path, model_cache):
    tok = token()
    valid = [chat("chat-1", "Hello there", max_tokens=8), completion("comp-1", "The cluster of Macs", max_tokens=12),
             chat("chat-2", "Count to three", max_tokens=16, temperature=0), completion("comp-2", "def f(x):")]
    inp = write_jsonl(tmp_path / "requests.jsonl", [
        valid[0], valid[1],
        '{"custom_id": "broken-json", ',                                                   # 3
        valid[2],
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},               # 5
        {**completion("wrong-url"), "url": "/v1/embeddings"},                                # 6
        "",
        valid[3],
        completion("chat-1"),                                                                # 9 duplicate
    ])
    out = tmp_path / "results.jsonl"
    r = run("batch", MODEL, *cluster_args(tok), "--concurrency", "4", "-i", str(inp), "-o", str(out),
            env=env_for_tests(EXOLAUNCH_CACHE=str(model_cache)), timeout=240)
    assert r.returncode == 1, r.stderr  # the malformed lines
    res = read_output(out)
    assert sorted(res) == sorted([v["custom_id"] for v in valid] + ["wrong-url"])
    for v in valid:
        x = res[v["custom_id"]]
        assert x["error"] is None and x["response"]["status_code"] == 200, x
        body = x["response"]["body"]
        assert body["object"] == ("chat.completion" if v["url"].endswith("chat/completions") else "text_completion")
        assert body["model"] == MODEL and x["response"]["request_id"] == body["id"]
        assert body["usage"]["completion_tokens"] == v["body"]["max_tokens"]  # ignore_eos: exact lengths
        assert body["choices"][0]["finish_reason"] == "length"
    assert res["wrong-url"]["response"] is None and res["wrong-url"]["error"]["code"] == "invalid_request"
    assert res["wrong-url"]["error"]["message"].startswith(f"{inp}:6: url:")
    for n, what in ((3, "not valid JSON"), (5, "custom_id: missing"), (6, "url:"),
                    (9, 'custom_id: "chat-1" is also used on line 1')):
        assert f"{inp}:{n}: {what}" in r.stderr, r.stderr
    assert "4 ok, 0 failed, 4 malformed (lines 3, 5, 6, 9)" in r.stderr
    assert "completion tok/s" in r.stderr and f"output: {out} (5 lines)" in r.stderr
    assert "\x1b[" not in r.stderr and "Traceback" not in r.stderr  # no TTY: plain lines only
    wait_no_token_procs(tok)


@pytest.mark.slow
def test_interrupt_kill_and_resume_answer_every_request_exactly_once(tmp_path, model_cache):
    tok = token()
    n = 40
    inp = write_jsonl(tmp_path / "requests.jsonl",
                      [(chat if i % 2 else completion)(f"r{i:02d}", f"request number {i}", max_tokens=24)
                       for i in range(n)])
    out = tmp_path / "results.jsonl"
    jpath = Path(f"{out}.journal")
    env = env_for_tests(EXOLAUNCH_CACHE=str(model_cache))
    args = ("batch", MODEL, *cluster_args(tok), "--concurrency", "4", "-i", str(inp), "-o", str(out))

    def start_and_wait_for(at_least: int):
        proc = start(*args, env=env)
        deadline = time.monotonic() + 180
        while n_ok(jpath) < at_least:
            assert proc.poll() is None, f"batch ended early ({proc.returncode}): {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        return proc

    # 1. Ctrl-C: a clean stop, exit 130, the output holds what was answered, the cluster is gone.
    proc = start_and_wait_for(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    done1 = n_ok(jpath)
    assert 3 <= done1 < n, done1
    assert "interrupted:" in err and "not answered yet: run the same command again" in err
    assert set(read_output(out)) == {cid for cid, (s, _, _) in journal_rows(jpath).items() if s == "ok"}
    wait_no_token_procs(tok)

    # 2. SIGKILL mid-batch: nothing can run on our side; the cluster must still die with us.
    proc = start_and_wait_for(done1 + 3)
    assert token_procs(tok), "no cluster processes found while the batch runs (the check would prove nothing)"
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    rows = journal_rows(jpath)
    done2 = {cid: json.loads(res) for cid, (s, res, _) in rows.items() if s == "ok"}
    assert done1 < len(done2) < n, f"{len(done2)} done when killed"
    wait_no_token_procs(tok)

    # 3. The same command again finishes the rest; what was done is not sent again.
    r = run(*args, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"{n - len(done2)} ok, 0 failed, 0 malformed, {len(done2)} already done on a previous run" in r.stderr
    res = read_output(out)
    assert list(res) == [f"r{i:02d}" for i in range(n)]
    for cid, x in res.items():
        assert x["error"] is None and x["response"]["status_code"] == 200
        assert x["response"]["body"]["usage"]["completion_tokens"] == 24
    for cid, line in done2.items():
        assert res[cid] == line, f"{cid} was answered again"
    wait_no_token_procs(tok)


@pytest.mark.slow
def test_url_against_a_running_cluster_with_an_api_key(tmp_path, model_cache):
    inp = write_jsonl(tmp_path / "requests.jsonl", [chat(f"c{i}", max_tokens=6) for i in range(3)] +
                      [completion(f"p{i}", max_tokens=6) for i in range(3)])
    with ServingCluster(MODEL, "--api-key", "sekrit", cache=model_cache) as c:
        out = tmp_path / "ok.jsonl"
        r = run("batch", MODEL, "--url", c.base_url, "--api-key", "sekrit", "-i", str(inp), "-o", str(out),
                timeout=120)
        assert r.returncode == 0, r.stderr
        res = read_output(out)
        assert len(res) == 6 and all(x["response"]["status_code"] == 200 for x in res.values())
        assert "6 ok, 0 failed" in r.stderr and "starting a cluster" not in r.stderr

        # Without the key: 401 is final (not retried), recorded per request.
        out = tmp_path / "nokey.jsonl"
        r = run("batch", MODEL, "--url", c.base_url, "-i", str(inp), "-o", str(out), timeout=120,
                env={k: v for k, v in env_for_tests().items() if k != "EXOLAUNCH_API_KEY"})
        assert r.returncode == 1, r.stderr
        res = read_output(out)
        assert len(res) == 6 and {x["response"]["status_code"] for x in res.values()} == {401}
        assert {a for _, _, a in journal_rows(Path(f"{out}.journal")).values()} == {1}
        c.stop()
