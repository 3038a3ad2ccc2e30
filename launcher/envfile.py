"""Environment forwarding as mpirun does it: `-x VAR`, `-x VAR=value`, and `--env-file`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from launcher.errors import ConfigError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_x(items: list[str], environ=os.environ) -> dict[str, str]:
    env = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not NAME.match(name):
            raise ConfigError(f"-x {item!r}: {name!r} is not a valid environment variable name.")
        if not eq:
            if name not in environ:
                raise ConfigError(f"-x {name}: {name} is not set here. Fix: set it, or give a value with -x {name}=VALUE.")
            value = environ[name]
        env[name] = value
    return env


def load_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments, blank lines and a leading `export ` are allowed. Values are
    taken literally (one pair of surrounding quotes removed); nothing is expanded."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--env-file {path}: cannot read it ({e.strerror}).") from None
    env = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not NAME.match(name):
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE with KEY a variable name, got {raw!r}.")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name] = value
    return env
