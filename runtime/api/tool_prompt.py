"""Tools for models whose chat template ignores them: the fallback prompt format.

Some chat templates (SmolLM2's, many base-model templates) render neither `tools=` nor an
assistant turn's `tool_calls`: the tools would vanish from the prompt and "auto" tool use could
never happen. `template_ignores_tools(tokenizer)` finds out once per tokenizer by rendering a
probe conversation with and without a tool; when the renders are equal, `render_chat`
(runtime/api/prompt.py) rewrites the conversation with `inline_tools` before the template sees
it, in this documented format:

- the tool definitions go at the end of the system message (one is created first if the
  conversation has none):

      # Tools
      You may call these functions. Each line is one function's definition (JSON):
      {"name": "get_weather", "description": "...", "parameters": {...}}
      To call a function, reply with only a JSON object, one per call and nothing else:
      {"name": "<function name>", "arguments": {<the arguments>}}

- an assistant turn's earlier calls are appended to its text, one such JSON object per line
  (inside the model's own call markers, if its tokenizer has any), so the model sees what it
  did in the form it is asked to use;
- a tool result (role "tool") becomes user text
      <tool_result name="get_weather" call_id="call_1">
      ...the result...
      </tool_result>
  and consecutive user texts are joined into one user turn (templates that insist on
  alternating roles keep working).

With tool_choice "none" the definitions are left out (the earlier calls and results stay):
the instruction to reply with a call would contradict it, and a small model follows it.

Generated calls are parsed back by runtime/api/tools.ToolCallStream, whose JSON form is exactly
the object above (a forced call is constrained to it). `/api/show` reports "tools" for such
models too, since tool calling works through this format.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

PROBE_TOOL = {"type": "function", "function": {
    "name": "exolaunch_probe_tool", "description": "probe",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}

_ignores: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _render(tokenizer, messages: list[dict], tools: list[dict] | None) -> str | None:
    kw: dict[str, Any] = {"tools": tools} if tools else {}
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            **kw)
    except Exception:
        return None
    return out if isinstance(out, str) else str(out)


def template_ignores_tools(tokenizer) -> bool:
    """True when the chat template renders the same prompt with and without a tool (or cannot
    render tools at all). Only meaningful for tokenizers that have a chat template."""
    try:
        return _ignores[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = [{"role": "user", "content": "hello"}]
    plain, with_tools = _render(tokenizer, probe, None), _render(tokenizer, probe, [PROBE_TOOL])
    ignores = with_tools is None or with_tools == plain
    try:
        _ignores[tokenizer] = ignores  # rendered once per tokenizer
    except TypeError:
        pass
    return ignores


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def tools_text(tools: list[dict]) -> str:
    lines = ["# Tools", "You may call these functions. Each line is one function's definition "
             "(JSON):"]
    for t in tools:
        fn = t.get("function", t)
        lines.append(json.dumps({k: fn[k] for k in ("name", "description", "parameters")
                                 if k in fn}, ensure_ascii=False))
    lines.append("To call a function, reply with only a JSON object, one per call and nothing "
                 "else:")
    lines.append('{"name": "<function name>", "arguments": {<the arguments>}}')
    return "\n".join(lines)


def _call_text(call: dict, markers: tuple[str, str] | None) -> str:
    fn = call.get("function", call) if isinstance(call, dict) else {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            pass
    text = json.dumps({"name": fn.get("name"), "arguments": {} if args is None else args},
                      ensure_ascii=False)
    return f"{markers[0]}\n{text}\n{markers[1]}" if markers else text


def _result_text(m: dict) -> str:
    attrs = "".join(f' {k}={json.dumps(str(m[key]))}' for k, key in
                    (("name", "name"), ("call_id", "tool_call_id")) if m.get(key))
    return f"<tool_result{attrs}>\n{m.get('content') or ''}\n</tool_result>"


def inline_tools(messages: list[dict], tools: list[dict] | None,
                 markers: tuple[str, str] | None = None) -> list[dict]:
    """The conversation with the tools, calls and results written as text (the format above)."""
    out: list[dict] = []

    def add_user(text: str) -> None:
        if out and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{text}"}
        else:
            out.append({"role": "user", "content": text})

    for m in messages:
        role = m.get("role")
        if role == "tool":
            add_user(_result_text(m))
        elif role == "user":
            add_user(m.get("content") or "")
        elif role == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            parts += [_call_text(c, markers) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if tools:
        block = tools_text(tools)
        if out and out[0]["role"] == "system":
            first = out[0].get("content") or ""
            out[0] = dict(out[0], content=f"{first}\n\n{block}" if first else block)
        else:
            out.insert(0, {"role": "system", "content": block})
    return out
