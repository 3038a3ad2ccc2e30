"""Tool (function) calling shared by every dialect.

The model's own tool-call syntax comes from mlx-lm's TokenizerWrapper: `has_tool_calling`,
`tool_call_start` / `tool_call_end` (the markup around a call, e.g. "<tool_call>" and
"</tool_call>" for Hermes/Qwen-style templates like the demo models') and `tool_parser`
(text between the markers -> {"name", "arguments"} or a list of them).

Fallback for tokenizers without tool calling (no markers, no parser): a generated top-level JSON
object of the form `{"name": "<tool>", "arguments": {...}}` (outside any other text, possibly
several in a row) is treated as a tool call; any other text is shown as is. Tools are still
passed to the chat template (most templates that lack a parser ignore them), and a forced call
(`tool_choice` required / named) is then exactly that JSON object.

Forcing (`forced_grammar`): "required" or a named tool compiles to an llguidance lark grammar
that admits exactly one call in the model's syntax (for JSON-in-markers parsers such as
json_tools: start marker, "\\n", `{"name": <one of the names>, "arguments": <object valid for
that tool's parameters>}`, "\\n", end marker), after which only EOS is allowed. So even a
random-weight model emits one valid, parseable call. Parsers with non-JSON syntax (XML-ish,
pythonic ...) are forced through the JSON fallback form, which ToolCallStream also accepts.

Validation (`function_tool`, `unique_tools`, `function_tools`, `checked_choice`): a function
definition's fields and a choice's fit to the tools are checked once here for every dialect.
`ToolSetup` is a request's tools and choice; `Splitter` is the view of one choice's generated
text every dialect consumes (parsed for calls when the setup is active, else passed through).

Streaming (`ToolCallStream`): text outside tool-call markup streams as it comes (a tail that
could still begin a start marker is held back); text inside markup is never shown. A completed
call becomes a ToolCall. A call whose body cannot be parsed (a weak model) is not dropped
silently: it is shown as text, markup included, so nothing the model produced is lost. An
unterminated call at the end (max_tokens cut it) is parsed if its body is complete; else, when
it is a JSON call object whose name is one of the tools, it is a *partial* ToolCall (arguments:
the prefix written so far, as OpenAI returns a call cut by max_tokens; `ToolCall.input()`
completes that prefix as far as it parses); else it is shown as text.

Forced calls close every object schema of the arguments (`closed_schema`), in every dialect.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Union

from runtime.constrain import JSON_DEFAULTS, UnsupportedGrammar

from .errors import bad_request
from .prompt import encode_continuation

__all__ = ["Tool", "ToolCall", "ToolSetup", "Splitter", "template_tools", "forced_grammar",
           "ToolCallStream", "parse_tool_calls", "function_tool", "function_tools",
           "unique_tools", "checked_choice", "tool_call_message", "tool_result_message",
           "new_call_id", "markers"]


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text (a prefix of it when partial)
    partial: bool = False  # cut off (max_tokens) before its arguments were complete

    def input(self) -> dict:
        """The arguments as an object (Anthropic's `input`, Ollama's `arguments`): a partial
        call's prefix completed as far as it parses."""
        value = repair_json(self.arguments) if self.arguments else {}
        if isinstance(value, dict):
            return value
        return {} if value is None and self.partial else {"arguments": self.arguments}

    def openai(self) -> dict:
        """OpenAI's tool_calls entry (also what chat templates read)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _params(tool: Tool) -> dict:
    p = tool.parameters
    if not isinstance(p, dict) or not p:
        return {"type": "object", "properties": {}}
    return p


def template_tools(tools: list[Tool]) -> list[dict]:
    """OpenAI function-format dicts, what chat templates expect in `tools=`."""
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = _params(t)
        out.append({"type": "function", "function": fn})
    return out


# ------------------------------------------------------------------------------------------------
# the model's syntax
# ------------------------------------------------------------------------------------------------


def markers(tokenizer) -> tuple[str, str] | None:
    """(start, end) markup of a tool call, or None when the tokenizer has no tool calling."""
    if tokenizer is None or not getattr(tokenizer, "has_tool_calling", False):
        return None
    start, end = getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None)
    if not start:
        return None
    return start, end or ""


def _json_in_markers(tokenizer) -> bool:
    """The parser reads a JSON {"name", "arguments"} object between the markers (json_tools)."""
    parser = getattr(tokenizer, "tool_parser", None)
    mod = getattr(parser, "__module__", "") or ""
    return mod.rsplit(".", 1)[-1] == "json_tools"


def _choice_tools(tools: list[Tool], choice: Any) -> list[Tool] | None:
    """The tools a choice forces (None: nothing forced)."""
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required" or choice == "any":
        if not tools:
            raise UnsupportedGrammar("tool_choice requires a tool call but no tools were given")
        return tools
    name = None
    if isinstance(choice, dict):
        name = choice.get("name")
        if name is None and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
    if not isinstance(name, str) or not name:
        raise UnsupportedGrammar(f"tool_choice {choice!r} is not supported: use \"auto\", \"none\", "
                                 "\"required\" or a named function")
    for t in tools:
        if t.name == name:
            return [t]
    raise UnsupportedGrammar(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(t.name for t in tools) or 'none given'})")


def closed_schema(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed (additionalProperties
    false unless it says otherwise), recursively: a forced call must end once the declared
    arguments are written, instead of inventing more until max_tokens. Objects under allOf
    stay open (closing both halves of a composition would admit nothing)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "allOf":
            out[k] = v
        elif k in ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas") and isinstance(v, dict):
            out[k] = {name: closed_schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalItems", "prefixItems", "anyOf", "oneOf", "not",
                   "additionalProperties", "if", "then", "else", "contains"):
            out[k] = closed_schema(v)
        else:
            out[k] = v
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tools: list[Tool]) -> dict:
    """JSON schema of one call object {"name": ..., "arguments": {...}} to one of the tools
    (arguments closed: `closed_schema`)."""
    alts = [{"type": "object",
             "properties": {"name": {"const": t.name}, "arguments": closed_schema(_params(t))},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    return dict(schema, **{"x-guidance": dict(JSON_DEFAULTS)})


def _lark_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid lark string literal


def forced_grammar(tokenizer, tools: list[Tool], choice) -> dict | None:
    """A grammar forcing exactly one call to one of the chosen tools in the model's syntax, or
    None for "auto" / "none". Raises UnsupportedGrammar (a ValueError: a 400) for a choice that
    names an unknown tool."""
    chosen = _choice_tools(tools, choice)
    if chosen is None:
        return None
    schema = call_schema(chosen)
    mk = markers(tokenizer)
    if mk is None or not _json_in_markers(tokenizer):
        return {"type": "json_schema", "schema": schema}
    start, end = mk
    lark = (f"start: {_marker_rule(tokenizer, start)} \"\\n\" call \"\\n\" {_marker_rule(tokenizer, end)}\n"
            f"call: %json {json.dumps(schema)}\n")
    return {"type": "lark", "grammar": lark}


def _marker_rule(tokenizer, marker: str) -> str:
    """Lark for a marker. Markers are usually added tokens, which llguidance treats as special
    (a string literal never matches them): allow the token itself (`<[id]>`) or the spelled-out
    text; both decode to the same text."""
    if not marker:
        return '""'
    ids = encode_continuation(tokenizer, marker)
    if len(ids) == 1:
        return f"(<[{int(ids[0])}]> | {_lark_str(marker)})"
    return _lark_str(marker)


# ------------------------------------------------------------------------------------------------
# parsing generated text
# ------------------------------------------------------------------------------------------------


def _arguments_text(args: Any) -> str:
    if isinstance(args, str):
        try:
            json.loads(args)
            return args
        except ValueError:
            return json.dumps(args, ensure_ascii=False)
    if args is None:
        args = {}
    return json.dumps(args, ensure_ascii=False)


def _as_calls(parsed: Any) -> list[ToolCall] | None:
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        args = it.get("arguments", it.get("parameters", {}))
        out.append(ToolCall(str(it.get("id") or new_call_id()), it["name"], _arguments_text(args)))
    return out or None


def _fallback_call(obj: Any) -> ToolCall | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj \
            and set(obj) <= {"name", "arguments", "id"}:
        calls = _as_calls(obj)
        return calls[0] if calls else None
    return None


def _json_scan(s: str) -> tuple[list[str], bool, int, list[int]]:
    """The structure of JSON text `s`: the closing brackets still owed (innermost last),
    whether it ends inside a string, the index after the first top-level value's closing
    bracket (-1: not closed yet), and where values begin (after each , { [ outside strings)."""
    stack: list[str] = []
    in_str = esc = False
    end = -1
    starts: list[int] = []
    for k, c in enumerate(s):
        if not in_str and c in ",{[":
            starts.append(k + 1)
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
            if not stack and end == -1:
                end = k + 1
    return stack, in_str, end, starts


def repair_json(text: str) -> Any:
    """The value of JSON `text`, or of its longest prefix that parses once its open strings
    and brackets are closed (a call cut off by max_tokens); None if nothing does."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    # Cut where the text ends, else where its last values began (a cut inside `true`, a
    # number or a key has to go): a few tries, each one pass.
    starts = _json_scan(text)[3]
    for end in [len(text), *reversed(starts[-16:])]:
        head = text[:end].rstrip().rstrip(",:")
        stack, in_str, _, _ = _json_scan(head)
        tail = ('"' if in_str else "") + "".join(reversed(stack))
        try:
            return json.loads(head + tail)
        except ValueError:
            continue
    return None


_PARTIAL_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"(.*)', re.DOTALL)
_ARGUMENTS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(.*)', re.DOTALL)
_CALL_OPENING = '{"name":"'


def _partial_call(text: str, tools: list[Tool]) -> ToolCall | None:
    """A call object cut off before its end, {"name": "<a tool>", "arguments": ... (the
    forced form, and json_tools' body): the call with the arguments written so far. Cut
    inside the name (or before it), it is the one tool that name can still become, if only
    one can."""
    m = _PARTIAL_CALL.fullmatch(text)
    if m is None:
        compact = re.sub(r"\s", "", text)
        if _CALL_OPENING.startswith(compact):
            prefix = ""  # cut before the name: only a lone tool is sure
        elif compact.startswith(_CALL_OPENING) and '"' not in compact[len(_CALL_OPENING):]:
            prefix = compact[len(_CALL_OPENING):]
        else:
            return None
        fits = [t for t in tools if t.name.startswith(prefix)]
        return ToolCall(new_call_id(), fits[0].name, "", partial=True) if len(fits) == 1 else None
    try:
        name = json.loads(f'"{m.group(1)}"')
    except ValueError:
        return None
    if name not in {t.name for t in tools}:
        return None
    rest = m.group(2)
    if ',"arguments":'.startswith(re.sub(r"\s", "", rest)):
        args = ""  # cut before the arguments began
    else:
        a = _ARGUMENTS.fullmatch(rest)
        if a is None:
            return None
        args = a.group(1).strip()
    if args.endswith("}") and repair_json(args[:-1] + "}") is not None:
        try:  # the arguments and the call's own closing brace
            json.loads(args[:-1])
            args = args[:-1].rstrip()
        except ValueError:
            pass
    return ToolCall(new_call_id(), name, args, partial=True)


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallStream:
    """Incremental parser of one choice's generated text: `feed` returns the text to show and
    the tool calls completed so far, in order; `finish` flushes at the end."""

    def __init__(self, tokenizer, tools: list[Tool]):
        self.tokenizer = tokenizer
        self.tools = tools
        self._tool_dicts = template_tools(tools)
        mk = markers(tokenizer)
        self.start, self.end = mk if mk else (None, None)
        self.parser = getattr(tokenizer, "tool_parser", None) if mk else None
        self._buf = ""
        self._in_call = False
        self.calls: list[ToolCall] = []  # every call emitted so far

    # -- marker mode ------------------------------------------------------------------------
    def _parse_body(self, body: str) -> list[ToolCall] | None:
        try:
            if self.parser is not None:
                parsed = self.parser(body, self._tool_dicts)
            else:
                parsed = json.loads(body.strip())
        except Exception:
            try:  # the JSON fallback form is accepted inside markers too
                parsed = json.loads(body.strip())
            except Exception:
                return None
        return _as_calls(parsed)

    def _feed_markers(self, final: bool) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self.start)
                if i == -1:
                    keep = 0 if final else _held_prefix(self._buf, self.start)
                    text = self._buf[:len(self._buf) - keep]
                    if text:
                        out.append(text)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                if i:
                    out.append(self._buf[:i])
                self._buf = self._buf[i + len(self.start):]
                self._in_call = True
            else:
                j = self._buf.find(self.end) if self.end else -1
                if j == -1:
                    if not final:
                        return out
                    body, raw = self._buf, self.start + self._buf
                    self._buf, self._in_call = "", False
                    calls = self._parse_body(body) if body.strip() else None
                    if not calls:  # inside the markers: a call, if we can tell whose
                        cut = _partial_call(body, self.tools)
                        calls = [cut] if cut else None
                    out.extend(calls if calls else [raw])
                    return out
                body = self._buf[:j]
                raw = self.start + self._buf[:j + len(self.end)]
                self._buf = self._buf[j + len(self.end):]
                self._in_call = False
                calls = self._parse_body(body)
                out.extend(calls if calls else [raw])

    # -- JSON fallback mode -------------------------------------------------------------------
    @staticmethod
    def _object_end(s: str) -> int:
        """Index after the top-level JSON object starting at s[0] == '{', or -1 if incomplete."""
        return _json_scan(s)[2]

    def _feed_json(self, final: bool) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        while self._buf:
            stripped = self._buf.lstrip()
            if not stripped:
                if final:
                    out.append(self._buf)
                    self._buf = ""
                return out  # whitespace: wait to see what follows
            if not stripped.startswith("{") or not self.tools:
                out.append(self._buf)
                self._buf = ""
                if self.tools:
                    self._json_done = True  # text seen: no longer a bare-JSON call
                return out
            end = self._object_end(stripped)
            if end == -1:
                if final:
                    cut = _partial_call(stripped, self.tools)
                    out.append(cut if cut else self._buf)
                    self._buf = ""
                return out
            try:
                call = _fallback_call(json.loads(stripped[:end]))
            except ValueError:
                call = None
            if call is None:
                out.append(self._buf)
                self._buf = ""
                self._json_done = True
                return out
            out.append(call)
            self._buf = stripped[end:]
        return out

    # -- API ------------------------------------------------------------------------------------
    _json_done = False

    def _run(self, final: bool) -> list[str | ToolCall]:
        if self.start is not None:
            items = self._feed_markers(final)
        elif self._json_done or not self.tools:
            items = [self._buf] if self._buf else []
            self._buf = ""
        else:
            items = self._feed_json(final)
        merged: list[str | ToolCall] = []
        for it in items:
            if isinstance(it, ToolCall):
                self.calls.append(it)
                merged.append(it)
            elif it:
                if merged and isinstance(merged[-1], str):
                    merged[-1] += it
                else:
                    merged.append(it)
        return merged

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[str | ToolCall]:
        return self._run(final=True)


def parse_tool_calls(tokenizer, tools: list[Tool], text: str) -> tuple[str, list[ToolCall]]:
    """A whole text at once: (visible text, calls)."""
    s = ToolCallStream(tokenizer, tools)
    items = s.feed(text) + s.finish()
    return "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, ToolCall)]


# ------------------------------------------------------------------------------------------------
# messages for the next turn
# ------------------------------------------------------------------------------------------------


def tool_call_message(calls: list[ToolCall], content: str | None = None) -> dict:
    """An OpenAI-style assistant message carrying tool calls (render_chat accepts it)."""
    return {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}


def tool_result_message(call_id: str, content: str, name: str | None = None) -> dict:
    m = {"role": "tool", "tool_call_id": call_id, "content": content}
    if name:
        m["name"] = name
    return m


ToolItem = Union[str, ToolCall]


def function_tool(fn: dict, where: str, *, close_objects: bool = False) -> Tool:
    """One function definition {name, description?, parameters?} -> Tool; a 400 names the
    field under `where`. close_objects: declared properties only (additionalProperties false)
    unless the schema says otherwise, for clients that strip the constraints that keep weak
    models on track."""
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}.name: required", f"{where}.name")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad_request(f"{where}.parameters: must be a JSON schema object",
                          f"{where}.parameters")
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise bad_request(f"{where}.description: must be a string", f"{where}.description")
    if close_objects and isinstance(params.get("properties"), dict) \
            and "additionalProperties" not in params:
        params = {**params, "additionalProperties": False}
    return Tool(name=name, description=desc, parameters=params)


def unique_tools(tools: list[Tool]) -> list[Tool]:
    names = [t.name for t in tools]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise bad_request(f"tools: function names must be unique ({dup[0]!r} is repeated)",
                          "tools")
    return tools


def function_tools(raw: list | None, *, close_objects: bool = False) -> list[Tool]:
    """OpenAI-format function tools {"type": "function", "function": {...}} (also Ollama's)."""
    out: list[Tool] = []
    for i, t in enumerate(raw or []):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise bad_request(f"{where}: expected an object", where)
        if t.get("type", "function") != "function":
            raise bad_request(f"{where}.type: only function tools are supported, got {t.get('type')!r}",
                              f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function: required (an object with a name)", f"{where}.function")
        out.append(function_tool(fn, f"{where}.function", close_objects=close_objects))
    return unique_tools(out)


@dataclass
class ToolSetup:
    """A request's tools and tool choice, as every dialect needs them."""

    tools: list[Tool] = field(default_factory=list)
    choice: Any = "auto"  # "auto" | "none" | "required" | {"name": fn}

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"


def checked_choice(tools: list[Tool], choice: Any, name_param: str = "tool_choice") -> Any:
    """A choice already in the shared form, once it fits the tools: a named function must be
    one of them, "required" needs at least one (400s name the field)."""
    if isinstance(choice, dict) and choice["name"] not in {t.name for t in tools}:
        raise bad_request(f"{name_param}: no function named {choice['name']!r} in tools",
                          name_param)
    if choice == "required" and not tools:
        raise bad_request("tool_choice: \"required\" needs at least one tool", "tool_choice")
    return choice


class Splitter:
    """One choice's generated text -> text pieces and ToolCalls, in order: parsed for calls when
    the setup is active, passed through otherwise. Never yields an empty string."""

    def __init__(self, tokenizer, setup: ToolSetup):
        self.stream = ToolCallStream(tokenizer, setup.tools) if setup.active else None

    def feed(self, text: str) -> list[ToolItem]:
        if self.stream is None:
            return [text] if text else []
        return self.stream.feed(text)

    def finish(self) -> list[ToolItem]:
        return self.stream.finish() if self.stream is not None else []
