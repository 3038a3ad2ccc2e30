"""A sweep: the cross product of models × rank counts × backends × shardings × prompt tokens ×
generated tokens × concurrency, each point measured `repeats` times. From a YAML file in
configs/sweeps/ or from flags (flags override the file's fields).

    name: demo-100m
    models: [demo-llama:100m]
    ranks: [1, 2]              # each N = the first N slots of the hostfile
    backends: [mpi]
    shardings: [tensor]
    prompt_tokens: [32, 512]
    gen_tokens: [128]
    concurrency: [1, 8]
    blas: [bundled, openblas]  # CPU ranks on Linux, both servers alike (default [auto]: OpenBLAS if found)
    repeats: 3
    warmup: 1                  # untimed requests per cluster before its first point
    idle_seconds: 5            # idle-CPU window per cluster
    against: [mlx-lm]          # optional: the anchor, mlx.launch / mpirun + mlx_lm.server
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher.blas import MODES as BLAS_MODES  # or an absolute path to a BLAS library
from launcher.errors import ConfigError
from runtime.contract import BACKENDS, SHARDINGS
ANCHORS = ("mlx-lm",)
LIST_FIELDS = ("models", "ranks", "backends", "shardings", "blas", "prompt_tokens", "gen_tokens", "concurrency")


def _positive(vs: list[int]) -> list[int]:
    bad = [v for v in vs if v < 1]
    if bad:
        raise ValueError(f"expected whole numbers of at least 1, got {bad}")
    return vs


def _members(vs: list[str], allowed: tuple, what: str) -> list[str]:
    bad = [v for v in vs if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad[0]!r}; expected {', '.join(allowed)}")
    return vs


def _blas_modes(vs: list[str]) -> list[str]:
    bad = [v for v in vs if v not in BLAS_MODES and not os.path.isabs(v)]
    if bad:
        raise ValueError(f"unknown BLAS {bad[0]!r}; expected {', '.join(BLAS_MODES)} or an absolute path to a "
                         f"BLAS library")
    return vs


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "adhoc"
    models: list[str] = Field(default_factory=lambda: ["demo-llama:100m"], min_length=1)
    ranks: list[int] = Field(default_factory=lambda: [2], min_length=1)
    backends: list[str] = Field(default_factory=lambda: ["mpi"], min_length=1)
    shardings: list[str] = Field(default_factory=lambda: ["tensor"], min_length=1)
    # `run --blas` for our ranks and the same environment for the anchor's (launcher/blas.py)
    blas: list[str] = Field(default_factory=lambda: ["auto"], min_length=1)
    prompt_tokens: list[int] = Field(default_factory=lambda: [32], min_length=1)
    gen_tokens: list[int] = Field(default_factory=lambda: [128], min_length=1)
    concurrency: list[int] = Field(default_factory=lambda: [1], min_length=1)
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    idle_seconds: float = Field(5.0, ge=0)
    against: list[str] = Field(default_factory=list)

    _ints = field_validator("ranks", "prompt_tokens", "gen_tokens", "concurrency")(_positive)

    _backends = field_validator("backends")(lambda vs: _members(vs, BACKENDS, "backend"))
    _shardings = field_validator("shardings")(lambda vs: _members(vs, SHARDINGS, "sharding"))
    _against = field_validator("against")(lambda vs: _members(vs, ANCHORS, "anchor"))
    _blas = field_validator("blas")(_blas_modes)

    def clusters(self) -> Iterator[tuple[str, int, str, str, str]]:
        """(model, ranks, backend, sharding, blas): what needs a cluster of its own."""
        return itertools.product(self.models, self.ranks, self.backends, self.shardings, self.blas)

    def loads(self) -> list[tuple[int, int, int]]:
        """(prompt_tokens, gen_tokens, concurrency) measured on each cluster."""
        return list(itertools.product(self.prompt_tokens, self.gen_tokens, self.concurrency))

    def size(self) -> int:
        servers = 1 + len(self.against)
        return len(list(self.clusters())) * len(self.loads()) * self.repeats * servers


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; expected one of: {', '.join(Sweep.model_fields)}"
        lines.append(f"{source}: {field}: {msg}.")
    return " ".join(lines)


def load_sweep(path: Path | None, overrides: dict) -> Sweep:
    """The sweep from a YAML file (if given) with flag values on top; errors name file and field."""
    data: dict = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such sweep file. Fix: pass a YAML file such as "
                              f"configs/sweeps/demo-100m.yaml.") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sweep fields (models:, ranks:, ...).")
        data.setdefault("name", Path(path).stem)
    data.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    try:
        return Sweep(**data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def csv_ints(flag: str, value: str | None) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4] for a list flag."""
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected comma-separated whole numbers, e.g. 1,2,4.") from None


def csv_strs(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]

