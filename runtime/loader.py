"""Load this rank's shard of a model (mlx): the tensor or pipeline split, and the output head
split by vocabulary.

Tensor parallelism takes one of three paths (runtime.contract.TensorSplit.route, which `plan`
shows too): mlx-lm's own shard() where the architecture has one and everything divides by the
rank count; else exolaunch's sharder (runtime/sharding.py), evenly ("generic") or by whole
KV-head groups and quantization groups ("uneven").

What a model name means and where its directory is (runtime.contract.resolve_model) and the
sharding checks (runtime.contract.check_sharding, run here before any shard(): mlx-lm's does
not check divisibility and crashes later with an empty reshape) live in runtime/contract.py,
which the launcher's planner shares without importing mlx.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from runtime.contract import ENV_SHARD_HEAD, ModelError, check_sharding, read_config


def load(path: Path, group: mx.distributed.Group, sharding: str, model_id: str):
    """(model, tokenizer, config) for this rank."""
    from mlx_lm.utils import _get_classes, load as mlx_load, sharded_load

    from runtime.group import drain
    from runtime.sharding import shard_model

    config = read_config(path)
    world = group.size()
    split = check_sharding(path, config, world, sharding, model_id)
    if world == 1:
        model, tokenizer = mlx_load(str(path))
        return model, tokenizer, config
    drain()  # the loads below run collectives: nothing of an earlier model may still be queued
    try:
        if sharding == "tensor":
            route, why = split.route(str(config.get("model_type")), hasattr(_get_classes(config)[0], "shard"))
            if group.rank() == 0:
                print(f"tensor parallel over {world} ranks: {route} ({why})", file=sys.stderr, flush=True)
            if route == "mlx-lm shard":
                model, tokenizer = sharded_load(str(path), tensor_group=group)
            else:
                model, tokenizer = mlx_load(str(path), lazy=True)
                shard_model(model, group, model_id)
                mx.eval(model.parameters())
                mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu, group=group))  # leave loading together
            if os.environ.get(ENV_SHARD_HEAD, "1") != "0":
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
