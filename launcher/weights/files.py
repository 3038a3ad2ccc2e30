"""Which files of a model each host needs, and where a copy goes.

Tensor-parallel ranks need every file. Pipeline ranks need the shared files (config, tokenizer,
everything but *.safetensors) and the safetensors that hold their layers, following mlx-lm's
own split. layer_range, config_layers and pipeline_selection also run on the hosts (inlined
into the hub snippet by launcher.weights.hostside), so they use only the standard library and
no module globals.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile
from runtime.contract import ENV_MODELS

# Copied last, in their own step: a reader that trusts them must never see them before the rest.
LAST_FILES = (".exolaunch-complete",)
# Never staged: locks, temp dirs of demo_models.ensure, hf local_dir metadata, VCS.
_SKIP_RE = re.compile(r"(^|/)(\.git|\.cache|\.[^/]*\.tmp-[^/]*|\.[^/]*\.old-[^/]*)(/|$)|\.lock$|\.incomplete$")
# What a rank needs besides weights (mlx_lm.sharded_load's first download).
META_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


def models_root(host: Host, hostfile: Hostfile) -> str | None:
    """$EXOLAUNCH_MODELS for this host (its own env first, then the hostfile's): where
    models go as <root>/<name>, or None."""
    return host.env.get(ENV_MODELS) or hostfile.env.get(ENV_MODELS)


# ----------------------------------------------------------------------------- pipeline split (runs on hosts too)


def layer_range(n_layers: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the layers pipeline rank `rank` of `size` holds, as mlx-lm's
    PipelineMixin.pipeline splits them: evenly, low ranks get the extra layers, and rank r runs
    the layers after those of ranks r+1..size-1 (the last rank holds the first layers)."""
    base, extra = divmod(n_layers, size)
    split = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(split[rank + 1:])
    return start, start + split[rank]


def config_layers(config: dict) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("num_hidden_layers"), int):
            return c["num_hidden_layers"]
    return None


def pipeline_selection(weight_map: dict, n_layers: int, ranks: list, size: int) -> set:
    """Safetensors files the given pipeline ranks load (mlx_lm.sharded_load's rule: a tensor of
    layer L goes to the stage holding L; tensors outside any layer go to every stage)."""
    ranges = [layer_range(n_layers, r, size) for r in ranks]
    out = set()
    for key, fname in weight_map.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        if m is None or any(s <= int(m.group(1)) < e for s, e in ranges):
            out.add(fname)
    return out


# ----------------------------------------------------------------------------- model directories


def uses_default_pipeline_split(model_type: str | None) -> bool:
    """True when mlx-lm's model for model_type pipelines with PipelineMixin's even split.
    Models with their own split (or unknown here) make every stage fetch every file."""
    if not model_type:
        return False
    try:
        import importlib

        from mlx_lm.models.pipeline import PipelineMixin
        from mlx_lm.utils import MODEL_REMAPPING

        mod = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    except Exception:
        return False
    mixins = [c for c in vars(mod).values()
              if isinstance(c, type) and issubclass(c, PipelineMixin) and c is not PipelineMixin]
    return bool(mixins) and all(
        all("pipeline" not in vars(k) for k in c.__mro__ if k is not PipelineMixin and k is not object)
        for c in mixins)


def list_model_files(model_dir: Path) -> list[str]:
    """Relative paths of the files to stage (symlinks followed), sorted, LAST_FILES at the end."""
    out = []
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        dirs.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), model_dir).replace(os.sep, "/")
            if not _SKIP_RE.search(rel) and os.path.isfile(os.path.join(root, n)):
                out.append(rel)
    return sorted(out, key=lambda r: (r.rsplit("/", 1)[-1] in LAST_FILES, r))


def files_for_ranks(model_dir: Path, hostfile: Hostfile, sharding: str = "tensor") -> dict[str, set[str] | None]:
    """{host name: relative paths its ranks need}, None meaning every file.

    Tensor parallel ranks need everything. Pipeline ranks need the shared files (config,
    tokenizer, everything but *.safetensors) and the safetensors holding their layers, their
    non-layer tensors (embeddings, norm, head) included."""
    if sharding == "tensor":
        return {h.name: None for h in hostfile.hosts}
    if sharding != "pipeline":
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        raise ConfigError(f"{model_dir}: pipeline sharding needs model.safetensors.index.json (to fetch only "
                          "each stage's layers). Fix: use --sharding tensor, or re-save with mlx_lm.convert.")
    config = json.loads((model_dir / "config.json").read_text())
    n_layers = config_layers(config)
    if n_layers is None or not uses_default_pipeline_split(config.get("model_type")):
        return {h.name: None for h in hostfile.hosts}
    weight_map = json.loads(index_path.read_text())["weight_map"]
    shared = [f for f in list_model_files(model_dir) if not f.endswith(".safetensors")]
    world = hostfile.world_size
    if n_layers < world:
        raise ConfigError(f"{model_dir.name}: {n_layers} layers cannot be split into {world} pipeline stages.")
    out: dict[str, set[str] | None] = {}
    for h in hostfile.hosts:
        ranks = [r.rank for r in hostfile.ranks() if r.host.name == h.name]
        out[h.name] = set(shared) | pipeline_selection(weight_map, n_layers, ranks, world)
    return out
