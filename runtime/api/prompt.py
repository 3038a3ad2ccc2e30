"""Prompt building shared by every dialect: chat template rendering, completion prompts, and
the text / bytes of single tokens (for logprobs).

Chat messages are plain dicts `{"role", "content", ...}` (extra keys such as `tool_calls`,
`tool_call_id`, `name` are kept for the template). `content` may be a string, None, or a list
of parts; text parts are concatenated (no separator: OpenAI's semantics, and what the demo
models' template does) so templates that only understand strings still work. Any non-text part
is a 400. The role "developer" (newer OpenAI clients) is given to the template as "system".

Given `context_length`, text that cannot fit that context at any natural density is refused
(400) before the tokenizer sees it (runtime/api/limits.py, CHARS_PER_TOKEN): tokenization runs
on one thread for every request, and 8 MB of text would hold it for seconds.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Iterable

from . import tool_prompt
from .errors import bad_request
from .limits import check_prompt_chars

_ROLE_ALIASES = {"developer": "system"}


def flatten_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, dict):
                raise bad_request(f"{where}[{i}]: expected a content part object", f"{where}[{i}]")
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise bad_request(
                    f"{where}[{i}]: content part type {kind!r} is not supported "
                    "(this server serves a text-only model: use text parts)", f"{where}[{i}]")
        return "".join(out)
    raise bad_request(f"{where}: expected a string or a list of content parts", where)


def normalize_messages(messages: Iterable[dict[str, Any]], param: str = "messages") -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{param}[{i}].role: required", f"{param}[{i}].role")
        m["role"] = _ROLE_ALIASES.get(role, role)
        if "content" in m:
            m["content"] = flatten_content(m["content"], f"{param}[{i}].content")
        out.append({k: v for k, v in m.items() if v is not None or k == "content"})
    return out


def _as_ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):  # batched
        out = out[0]
    return [int(t) for t in out]


def _template_message(m: dict) -> dict:
    """Content None (an assistant turn that only called tools) as "", and assistant tool calls
    as templates expect them: `function.arguments` a dict (HF's
    convention; a JSON string from the wire is parsed, a string that is not a JSON object is
    kept as is) and every call with "type": "function"."""
    if m.get("content") is None:  # an assistant turn that only called tools: templates
        m = dict(m, content="")    # concatenate content, and None is not a string
    calls = m.get("tool_calls")
    if not calls:
        if "tool_calls" in m:
            m = {k: v for k, v in m.items() if k != "tool_calls"}
        return m
    out = []
    for c in calls:
        if not isinstance(c, dict):
            out.append(c)
            continue
        c = dict(c)
        fn = c.get("function")
        if isinstance(fn, dict):
            fn = dict(fn)
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args) if args.strip() else {}
                    if isinstance(parsed, dict):
                        fn["arguments"] = parsed
                except ValueError:
                    pass
            elif args is None:
                fn["arguments"] = {}
            c["function"] = fn
            c.setdefault("type", "function")
        out.append(c)
    return dict(m, tool_calls=out)


def _plain_transcript(messages: list[dict], tools: list[dict] | None) -> str:
    parts = []
    if tools:
        parts.append("tools: " + json.dumps(tools) + "\n")
    for m in messages:
        line = f"{m['role']}: {m.get('content') or ''}"
        for c in m.get("tool_calls") or []:
            fn = c.get("function", c) if isinstance(c, dict) else {}
            line += " " + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")})
        parts.append(line + "\n")
    return "".join(parts)


def _fold_late_system(messages: list[dict]) -> list[dict]:
    """System messages after the conversation started, as user text ("System: ..."), joined
    to the neighbouring user turn: for templates that refuse a system message anywhere but
    first (Anthropic's and OpenAI's APIs allow them mid-conversation)."""
    out: list[dict] = []
    started = False
    for m in messages:
        role = m.get("role")
        if role == "system" and started:
            text = f"System: {m.get('content') or ''}"
            m = {"role": "user", "content": text}
        if role != "system":
            started = True
        if m["role"] == "user" and out and out[-1]["role"] == "user" \
                and not out[-1].get("tool_calls"):
            out[-1] = dict(out[-1], content=f"{out[-1].get('content') or ''}\n\n"
                                            f"{m.get('content') or ''}")
        else:
            out.append(m)
    return out


def _has_late_system(messages: list[dict]) -> bool:
    started = False
    for m in messages:
        if m.get("role") != "system":
            started = True
        elif started:
            return True
    return False


def text_chars(value: Any) -> int:
    """Characters in every string inside `value` (messages, tools: what a template renders)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def _bounded(chars: int, context_length: int | None, param: str) -> None:
    if context_length:
        check_prompt_chars(chars, context_length, param)


def _encode(tokenizer, text: str, param: str, special_tokens: bool = True) -> list[int]:
    try:
        if special_tokens:
            return [int(t) for t in tokenizer.encode(text)]
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # tokenizers whose encode takes no such flag
            ids = tokenizer.encode(text)
        return [int(t) for t in ids]
    except (TypeError, UnicodeError) as e:  # e.g. a lone surrogate, should one get this far
        raise bad_request(f"{param}: this text cannot be tokenized ({e})", param) from None


def render_chat(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
                param: str = "messages", context_length: int | None = None,
                calls_allowed: bool = True, **template_kwargs: Any) -> list[int]:
    """Token ids of `messages` through the model's chat template, with the generation prompt.

    `tools` (OpenAI function-format dicts, see runtime/api/tools.template_tools) go to the
    template as `tools=`. Assistant messages may carry `tool_calls` (OpenAI shape; string
    arguments are given to the template as dicts) and `role: "tool"` messages carry results.

    Without a chat template: "role: content" lines then "assistant:" (so a base model still
    answers), tools as one JSON line first. A template that ignores tools gets them, and the
    calls and results, written into the messages (runtime/api/tool_prompt.py; with
    `calls_allowed` False, tool_choice "none", the definitions are left out). A template
    that raises on a system message after the first turn gets those as user text; any other
    template error (e.g. "roles must alternate") is a 400 naming the reason.
    """
    if not messages:
        raise bad_request(f"{param}: at least one message is required", param)
    _bounded(text_chars(messages) + text_chars(tools), context_length, param)
    if not getattr(tokenizer, "has_chat_template", getattr(tokenizer, "chat_template", None)):
        messages = [_template_message(m) for m in messages]
        return encode_text(tokenizer, _plain_transcript(messages, tools) + "assistant:", param=param)
    if tool_prompt.uses_tools(messages, tools) and tool_prompt.template_ignores_tools(tokenizer):
        from .tools import markers  # tools.py imports this module

        # tool_choice "none": earlier calls and results only, no invitation to call
        messages = tool_prompt.inline_tools(messages, tools if calls_allowed else None,
                                            markers(tokenizer))
        tools = None
    messages = [_template_message(m) for m in messages]
    if tools:
        template_kwargs["tools"] = tools
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            **template_kwargs)
    except Exception as e:  # jinja TemplateError, TemplateSyntaxError, ValueError, KeyError ...
        if not _has_late_system(messages):
            raise bad_request(f"{param}: the chat template rejected these messages: {e}", param)
        # A template that only takes a leading system message gets the later ones as user text.
        try:
            out = tokenizer.apply_chat_template(_fold_late_system(messages),
                                                add_generation_prompt=True, **template_kwargs)
        except Exception as e2:
            raise bad_request(f"{param}: the chat template rejected these messages: {e2}",
                              param)
    return _as_ids(out)


def encode_text(tokenizer, text: str, *, param: str = "prompt",
                context_length: int | None = None) -> list[int]:
    """Token ids of a prompt as the tokenizer encodes it (BOS and the like added); an empty
    result becomes [BOS], or a 400 without one."""
    _bounded(len(text), context_length, param)
    ids = _encode(tokenizer, text, param)
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise bad_request(f"{param}: the prompt is empty", param)
        ids = [int(bos)]
    return ids


def encode_continuation(tokenizer, text: str, *, param: str = "prompt",
                        context_length: int | None = None) -> list[int]:
    """Token ids of text that continues a prompt: no BOS or other special tokens added."""
    _bounded(len(text), context_length, param)
    return _encode(tokenizer, text, param, special_tokens=False)


def check_token_ids(ids: list[int], vocab: int | None, *, param: str = "prompt") -> list[int]:
    """Token ids given by the client: none empty, each in the vocabulary."""
    if not ids:
        raise bad_request(f"{param}: the prompt is empty", param)
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise bad_request(f"{param}: token id {bad[0]} is out of range (vocabulary: {vocab})",
                          param)
    return ids


_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """Bytes and display text of single token ids, cached (logprobs entries)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        detok = getattr(tokenizer, "_detokenizer", None)
        self.byte_level = type(detok).__name__ == "BPEStreamingDetokenizer"
        self.spm = type(detok).__name__ == "SPMStreamingDetokenizer"
        try:
            self.added = set(tokenizer.get_added_vocab().keys())
        except Exception:
            self.added = set()
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        try:
            piece = self.tok.convert_ids_to_tokens(int(token_id))
        except Exception:
            piece = None
        if isinstance(piece, str):
            if piece in self.added:
                return piece.encode()
            if self.byte_level:
                from mlx_lm.tokenizer_utils import _byte_decoder

                table = _byte_decoder()
                if all(c in table for c in piece):
                    return bytes(table[c] for c in piece)
            m = _SPM_BYTE.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if self.spm:
                return piece.replace("\u2581", " ").encode()
        return self.tok.decode([int(token_id)]).encode()

    def text(self, token_id: int) -> str:
        """The token's text; a token that is not valid UTF-8 on its own is shown as
        `bytes:\\xNN...` (OpenAI's convention); `bytes` carries the exact bytes."""
        b = self.bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)
