"""The prefix KV cache on 2 ranks (issue 14): tensor and pipeline sharding give, with the cache on,
the same greedy tokens as one rank with the cache off, for exact repeats, a grown conversation, a
shared system prompt and an interleaved batch; and --kv-bits 8 runs batched under tensor
parallelism. Real clusters started by `exolaunch run`, driven over HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-kimi:tiny"  # mlx-lm's llama has no pipeline split; deepseek_v3 (kimi) has both
SYSTEM = [5 + (i * 7) % 1900 for i in range(200)]


def _complete(url: str, model: str, prompt: list[int], max_tokens: int = 8) -> tuple[str, dict]:
    r = httpx.post(f"{url}/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]


def _trace(url: str, model: str) -> list[str]:
    """Exact repeat, a conversation that grows, users sharing a system prompt, then a batch."""
    out = []
    turn = SYSTEM + [700, 701]
    for k in range(3):
        text, _ = _complete(url, model, turn)
        again, _ = _complete(url, model, turn)
        out += [text, again]
        turn = turn + [800 + k] * 3 + [710 + k, 711 + k]  # the next turn: more history, a new message
    users = [SYSTEM + [900 + i, 901 + i] for i in range(4)]
    out += [_complete(url, model, u)[0] for u in users]
    with ThreadPoolExecutor(4) as pool:  # the same four at once: one batch, prefixes restored
        out += list(pool.map(lambda u: _complete(url, model, u + [42])[0], users))
    return out


@pytest.fixture(scope="module")
def reference(model_cache):
    with ServingCluster(MODEL, "-n", "1", "--prefix-cache-gb", "0", cache=model_cache) as one:
        ref = _trace(one.base_url, MODEL)
        one.stop()
    return ref


@pytest.mark.parametrize("sharding", ["tensor", "pipeline"])
def test_two_ranks_with_the_cache_equal_one_rank_without(model_cache, reference, sharding):
    with ServingCluster(MODEL, "--sharding", sharding, "--prefix-cache-gb", "0.25", cache=model_cache) as c:
        assert _trace(c.base_url, MODEL) == reference
        c.stop()


def test_kv_bits_8_batched_under_tensor_parallelism_equals_one_rank(model_cache):
    model = "demo-llama:small"  # head size 32: quantization groups of 32
    prompts = [SYSTEM + [900 + i] * (1 + i) for i in range(4)]
    outs = []
    for args in (["-n", "1"], []):
        with ServingCluster(model, *args, "--kv-bits", "8", "--kv-group-size", "32", cache=model_cache) as c:
            with ThreadPoolExecutor(4) as pool:
                outs.append(list(pool.map(lambda p: _complete(c.base_url, model, p, 12)[0], prompts)))
            c.stop()
    assert outs[0] == outs[1]
