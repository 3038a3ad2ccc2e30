"""Resolve a model name to a local mlx-lm directory and load this rank's shard of it.

MODEL is a demo model name (generated offline, see demo_models), a local directory in mlx-lm
layout, or a Hugging Face repo id (downloaded with huggingface-hub; needs a reachable hub).
Sharding needs are checked before mlx-lm's shard(), which does not check divisibility and
crashes later with an empty reshape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from runtime import demo_models


class ModelError(Exception):
    """The model cannot be served as asked; the message names the model, numbers and ranks."""


def resolve(model: str) -> tuple[Path, str]:
    """(local directory, the id the API serves it under)."""
    if model in demo_models.DEMO_MODELS:
        return demo_models.ensure(model, size="small"), model
    if ":" in model and model.split(":", 1)[0] in demo_models.DEMO_MODELS:  # demo-llama:100m
        name, size = model.split(":", 1)
        return demo_models.ensure(name, size=size), model
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not an mlx-lm model directory (no config.json).")
        return path.resolve(), path.name
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelError(f"model {model!r}: no such directory, demo model ({', '.join(demo_models.DEMO_MODELS)}) "
                         "or Hugging Face repo id (owner/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.py", "*.jinja",
                                                             "tokenizer.model", "*.tiktoken", "*.txt"])), model
    except Exception as e:  # offline, unknown repo, auth: all end here
        raise ModelError(f"model {model!r}: could not fetch it from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Fix: check the repo id and network, "
                         "or pass a local directory.") from None


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


TENSOR_SPLIT_DIMS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size")


def check_sharding(path: Path, config: dict, world: int, sharding: str, model_id: str) -> None:
    """Refuse, with the numbers, what sharded_load would crash on later."""
    if world == 1:
        return
    if sharding == "tensor":
        bad = [(k, config[k]) for k in TENSOR_SPLIT_DIMS
               if isinstance(config.get(k), int) and config[k] % world]
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in bad)
            raise ModelError(f"{model_id}: tensor parallelism over {world} ranks needs these to divide by {world}: "
                             f"{what}. Fix: use a rank count that divides them, or --sharding pipeline.")
    elif sharding == "pipeline":
        if not (path / "model.safetensors.index.json").is_file():
            raise ModelError(f"{model_id}: pipeline sharding needs model.safetensors.index.json in {path} "
                             "(to load only each stage's layers). Fix: re-save the model with mlx_lm.convert.")
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers < world:
            raise ModelError(f"{model_id}: {layers} layers cannot be split into {world} pipeline stages.")
    else:
        raise ModelError(f"--sharding {sharding!r}: expected tensor or pipeline.")


def load(path: Path, group: mx.distributed.Group, sharding: str, model_id: str):
    """(model, tokenizer, config) for this rank."""
    from mlx_lm.utils import load as mlx_load, sharded_load

    config = read_config(path)
    world = group.size()
    check_sharding(path, config, world, sharding, model_id)
    if world == 1:
        model, tokenizer = mlx_load(str(path))
        return model, tokenizer, config
    try:
        if sharding == "tensor":
            model, tokenizer = sharded_load(str(path), tensor_group=group)
            if os.environ.get("EXOLAUNCH_SHARD_HEAD", "1") != "0":
                shard_output_head(model, group)
        else:
            model, tokenizer = sharded_load(str(path), pipeline_group=group)
    except ValueError as e:  # e.g. "The model does not support pipelining ..."
        raise ModelError(f"{model_id} ({config.get('model_type')}): {e}. "
                         f"Fix: use --sharding {'pipeline' if sharding == 'tensor' else 'tensor'}.") from None
    return model, tokenizer, config


class GatheredHead(nn.Module):
    """The output projection split by vocabulary rows across the tensor group, the logits
    gathered back. mlx-lm keeps lm_head whole on every rank, so each decode step re-reads the
    full vocab x hidden matrix everywhere (~1/8 of the demo llama's bytes, ~1.8 GB on Kimi K2
    in 4-bit); split, each rank reads 1/N of it and the gather moves only vocab floats per token.
    Every rank ends with the same logits, so sampling stays in lock-step."""

    def __init__(self, inner: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        local = self.inner(x)  # (..., vocab / N)
        full = mx.distributed.all_gather(mx.moveaxis(local, -1, 0), group=self.group)
        return mx.moveaxis(full, 0, -1)


def shard_output_head(model, group: mx.distributed.Group) -> bool:
    """Replace an untied lm_head by a GatheredHead when the vocabulary divides by the ranks."""
    from mlx.nn.layers.distributed import shard_linear

    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or not isinstance(head, (nn.Linear, nn.QuantizedLinear)) or weight.shape[0] % group.size():
        return False
    model.lm_head = GatheredHead(shard_linear(head, "all-to-sharded", group=group), group)
    mx.eval(model.lm_head.parameters())
    return True


def context_length(config: dict, default: int = 4096) -> int:
    for k in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions"):
        if isinstance(config.get(k), int):
            return config[k]
    return default
