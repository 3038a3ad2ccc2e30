"""Warm start (runtime/warm.py) and run's one-line launch timeline (launcher/timeline.py), on a
real 2-rank `exolaunch run`.

The ranks get an empty TMPDIR, so mlx has none of its CPU kernels built (a new host, CI, a
cleaned /tmp): without the warm-up the first top-p request pays seconds of C++ compilation that
the second does not, and the TTFT assertion fails (EXOLAUNCH_WARM=0 in this test's environment
is forwarded to the ranks, to check that it does).
"""

from __future__ import annotations

import os
import re
import time

import openai
import pytest

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
FIELDS = ["plan", "preflight", "ranks up", "weights", "warm", "api"]
LINE = re.compile(r"exolaunch: ready in (\d+\.\d) s: (.*)$")


@pytest.fixture(scope="module")
def cluster(model_cache, tmp_path_factory):
    cold = tmp_path_factory.mktemp("mlx-tmp")  # mlx keeps its kernel builds under $TMPDIR/mlx
    off = ["-x", f"EXOLAUNCH_WARM={os.environ['EXOLAUNCH_WARM']}"] if "EXOLAUNCH_WARM" in os.environ else []
    with ServingCluster(MODEL, "-n", "2", "-x", f"TMPDIR={cold}", *off, cache=model_cache, ready_timeout=300) as c:
        yield c
        c.stop()


def timeline(c: ServingCluster, timeout: float = 10.0) -> tuple[float, list[tuple[str, float]]]:
    """The timeline line (printed right after `serving ...`): (total, [(field, seconds)])."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(c.err):
            m = LINE.search(line.rstrip("\n"))
            if m:
                fields = [f.rsplit(" ", 1) for f in m.group(2).split(", ")]
                return float(m.group(1)), [(name, float(t)) for name, t in fields]
        assert time.monotonic() < deadline, "no timeline line:\n" + "".join(c.err)
        time.sleep(0.1)


def test_timeline_line_has_every_stage_in_order(cluster):
    total, fields = timeline(cluster)
    assert [name for name, _ in fields] == FIELDS, fields  # "warm": every rank reported its warm-up
    times = [t for _, t in fields]
    assert times == sorted(times) and times[0] > 0, fields
    assert times[-1] == total
    lines = [ln for ln in cluster.err if LINE.search(ln)]
    assert len(lines) == 1, lines


def ttft(client: openai.OpenAI, prompt: str, **kw) -> float:
    t0 = time.perf_counter()
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True}, **kw)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
    assert first is not None
    return first


def test_first_requests_pay_nothing_extra(cluster):
    timeline(cluster)  # ready
    client = openai.OpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=120)
    prompts = ["The cluster of Macs serves one model across", "Every token streams back to the client in"]
    for kw in ({"temperature": 0}, {"temperature": 0.7, "top_p": 0.9}):  # greedy, then the first top-p
        first, second = (ttft(client, p, **kw) for p in prompts)  # same length, no shared prefix
        assert first < 3 * second + 0.5, f"{kw}: first request's TTFT {first:.2f} s, the next one's {second:.2f} s"
