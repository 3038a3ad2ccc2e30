"""Reading a config file so that every error names its file, line and field.

What the hostfile and topology loaders share: read_text / read_yaml / read_yaml_mapping (YAML
parsed together with a field-path -> line map taken from the composed node tree, so line
numbers survive pyyaml building plain dicts), and Source, whose typed getters return a checked value or raise
one ConfigError shaped `<file>:<line>: <field>: <what is wrong>. Fix: <what to do>.`
Field paths are tuples of keys and list indexes, e.g. ("hosts", 0, "ssh").
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Iterable

import yaml

from launcher.errors import ConfigError

_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def config_error(file: str, line: int, where: str, what: str, fix: str) -> ConfigError:
    end = "" if fix.endswith(".") else "."
    return ConfigError(f"{file}:{line}: {where}: {what}. Fix: {fix}{end}")


def format_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "top level"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show(value: Any) -> str:
    """A short description of a bad value for messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Source:
    """A parsed config file that can name the line of any field path (tuple of keys/indexes)."""

    def __init__(self, label: str, lines: dict[tuple, int] | None = None):
        self.label = label
        self.lines = lines or {}

    def line(self, path: tuple) -> int:
        for i in range(len(path), -1, -1):  # nearest parent that has a node
            if path[:i] in self.lines:
                return self.lines[path[:i]]
        return 1

    def error(self, path: tuple, what: str, fix: str) -> ConfigError:
        return config_error(self.label, self.line(path), format_path(path), what, fix)

    # -- typed getters: each returns the checked value or raises one ConfigError

    def mapping(self, path: tuple, value: Any, fix: str) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping (key: value lines), got {show(value)}", fix)
        return value

    def keys(self, path: tuple, value: dict, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in value:
            if str(key) not in allowed:
                raise self.error(
                    path + (str(key),),
                    f"unknown key {str(key)!r}{did_you_mean(key, allowed)}",
                    f"use only these keys here: {', '.join(allowed)}",
                )

    def string(self, path: tuple, value: Any, fix: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {show(value)}", fix)
        if "\0" in value:
            raise self.error(path, "contains a NUL character, which no process can receive", fix)
        return value

    def integer(self, path: tuple, value: Any, lo: int, hi: int, what: str, fix: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(path, f"expected {what}, got {show(value)}", fix)
        return value

    def number(self, path: tuple, value: Any, lo: float, what: str, fix: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo:
            raise self.error(path, f"expected {what}, got {show(value)}", fix)
        return float(value)

    def choice(self, path: tuple, value: Any, choices: Iterable[str], fix: str) -> str:
        choices = list(choices)
        if value not in choices:
            raise self.error(
                path,
                f"expected one of {', '.join(choices)}, got {show(value)}"
                f"{did_you_mean(value, choices) if isinstance(value, str) else ''}",
                fix,
            )
        return value

    def env(self, path: tuple, value: Any) -> dict[str, str]:
        """Environment mapping; values become strings (bools -> "1"/"0"), never shell-checked."""
        value = self.mapping(path, value, "write env as NAME: value lines")
        return dict(self.env_entry(path + (str(key),), key, v) for key, v in value.items())

    def env_entry(self, path: tuple, key: Any, value: Any) -> tuple[str, str]:
        """One NAME=value of an environment; path names the entry in messages."""
        if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
            raise self.error(
                path,
                f"{str(key)!r} is not a valid environment variable name",
                "use letters, digits and _ only, not starting with a digit",
            )
        return key, self.env_value(path, value)

    def env_value(self, path: tuple, v: Any) -> str:
        if isinstance(v, bool):
            return "1" if v else "0"
        if isinstance(v, (int, float)):
            return str(v)
        if not isinstance(v, str):
            raise self.error(path, f"expected a string or number, got {show(v)}", 'quote the value, e.g. FOO: "" for empty')
        if "\0" in v:
            raise self.error(path, "contains a NUL character, which no process can receive", "remove it")
        return v


def read_text(path: str | os.PathLike, what: str) -> tuple[str, str]:
    label = os.fspath(path)
    try:
        with open(label, encoding="utf-8") as f:
            return label, f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{label}: cannot read the {what}: {reason}. Fix: check the path.") from None


def _node_lines(node: yaml.Node, path: tuple, lines: dict, dups: list) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
            if key in seen and key != "<<":
                dups.append((path + (key,), k.start_mark.line + 1))
            seen.add(key)
            lines.setdefault(path + (key,), k.start_mark.line + 1)  # the key's line wins
            _node_lines(v, path + (key,), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, path + (i,), lines, dups)


def read_yaml(label: str, text: str) -> tuple[Any, Source]:
    """Parse YAML and keep a field-path -> line map for messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(
            f"{label}:{line}: YAML syntax error: {e.problem}{context}. Fix: check indentation and "
            "quoting around that line (quote values containing ': ', '#', '{' or '[')."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}:1: YAML error: {e}. Fix: check the file is valid YAML.") from None
    lines: dict[tuple, int] = {}
    dups: list = []
    if node is not None:
        _node_lines(node, (), lines, dups)
    src = Source(label, lines)
    if dups:
        path, line = dups[0]
        raise config_error(label, line, format_path(path), "this key appears twice", "keep only one of them")
    return data, src


def read_yaml_mapping(label: str, text: str, keys: Iterable[str], *, empty_fix: str,
                      mapping_fix: str) -> tuple[dict, Source]:
    """A YAML file whose top level is a mapping with only these keys; an empty file is an error."""
    data, src = read_yaml(label, text)
    if data is None:
        raise src.error((), "the file is empty", empty_fix)
    src.mapping((), data, mapping_fix)
    src.keys((), data, keys)
    return data, src
