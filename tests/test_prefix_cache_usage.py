"""Cached prompt tokens reach each dialect's usage field (issue 14), read with the official SDKs:
OpenAI `prompt_tokens_details.cached_tokens`, Responses `input_tokens_details.cached_tokens`,
Anthropic `cache_read_input_tokens` (apart from `input_tokens`, as Anthropic counts them)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import API_MODEL

# long enough that most of it is reusable (the last prompt token is always prefilled)
SYSTEM = "You are a careful assistant. " * 40
TEMPLATE_HEAD = 16  # a "cold" request may still reuse the chat template's first tokens
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ant(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_openai_chat_reports_cached_tokens_on_a_repeat(oai):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "chat: first"}]
    cold = oai.chat.completions.create(model=API_MODEL, messages=msgs, max_tokens=4, **GREEDY)
    warm = oai.chat.completions.create(model=API_MODEL, messages=msgs, max_tokens=4, **GREEDY)
    assert cold.usage.prompt_tokens_details.cached_tokens < TEMPLATE_HEAD
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert warm.usage.prompt_tokens - 1 >= cached >= warm.usage.prompt_tokens // 2
    assert warm.choices[0].message.content == cold.choices[0].message.content


def test_openai_stream_usage_and_responses_report_cached_tokens(oai):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "stream: second"}]
    oai.chat.completions.create(model=API_MODEL, messages=msgs, max_tokens=4, **GREEDY)
    chunks = list(oai.chat.completions.create(model=API_MODEL, messages=msgs, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    other = "Answer in French. " * 40  # a system prompt no earlier request shared
    r1 = oai.responses.create(model=API_MODEL, instructions=other, input="responses: third", max_output_tokens=4)
    r2 = oai.responses.create(model=API_MODEL, instructions=other, input="responses: third", max_output_tokens=4)
    assert r1.usage.input_tokens_details.cached_tokens < TEMPLATE_HEAD
    assert r2.usage.input_tokens_details.cached_tokens > r2.usage.input_tokens // 2


def test_anthropic_counts_cache_reads_apart_from_input_tokens(ant):
    kw = dict(model=API_MODEL, system="Be brief. " * 60, max_tokens=4, extra_body=GREEDY,
              messages=[{"role": "user", "content": "anthropic: fourth"}])
    cold = ant.messages.create(**kw)
    warm = ant.messages.create(**kw)
    assert cold.usage.cache_read_input_tokens < TEMPLATE_HEAD
    assert warm.usage.cache_read_input_tokens > warm.usage.input_tokens  # most of the prompt came from the cache
    assert (warm.usage.input_tokens + warm.usage.cache_read_input_tokens
            == cold.usage.input_tokens + cold.usage.cache_read_input_tokens)  # the whole prompt, both times
    with ant.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.usage.cache_read_input_tokens > 0
