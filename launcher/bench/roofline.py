"""The decode roofline: how fast decode could go if every step only had to stream the bytes it
reads through memory at the measured bandwidth.

Bytes read per decode step, per rank, from the safetensors headers and config.json:
- transformer layers: all their weights; tensor parallel divides the matrices (ndim >= 2) by
  the rank count (mlx-lm shards every projection), norms stay whole;
- the output projection (lm_head, or the embedding when tied) in full on every rank; an untied
  input embedding is a row lookup and counts as nothing;
- the KV cache of each sequence at its mean context (prompt + gen/2), split like the heads.
Ranks on one host share its bandwidth. Tensor parallel ranks work at the same time, so a step
takes the slowest host's bytes / bandwidth; pipeline stages work one after another, so a
single stream's step takes the sum. This ignores compute and communication, which is why it
is a ceiling.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tensor_sizes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (bytes, ndim) for every tensor in the model's safetensors files (headers only)."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            out[name] = (count * _DTYPE_BYTES.get(meta["dtype"], 4), len(meta["shape"]))
    return out


def _config(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {**cfg.get("text_config", {}), **cfg}


def rank_bytes(model_dir: Path, world: int, sharding: str) -> list[float]:
    """Weight bytes each rank reads per decode step."""
    cfg = _config(model_dir)
    tied = cfg.get("tie_word_embeddings", False)
    n_layers = cfg.get("num_hidden_layers") or 1
    per_layer = [0.0] * n_layers
    layer_split = [0.0] * n_layers   # the part tensor parallel divides
    shared = 0.0
    for name, (size, ndim) in tensor_sizes(model_dir).items():
        m = _LAYER.search(name)
        if m and int(m.group(1)) < n_layers:
            (layer_split if ndim >= 2 else per_layer)[int(m.group(1))] += size
        elif "lm_head" in name or ("embed_tokens" in name and tied):
            shared += size
        elif "embed" in name:
            continue
        else:
            shared += size  # final norm and the like
    if sharding == "pipeline":
        out = []
        for r in range(world):
            lo, hi = r * n_layers // world, (r + 1) * n_layers // world
            out.append(sum(per_layer[lo:hi]) + sum(layer_split[lo:hi]) + shared * (r == world - 1))
        return out
    return [sum(per_layer) + sum(layer_split) / world + shared] * world


def kv_bytes_per_token(model_dir: Path, context: float) -> float:
    """KV cache bytes one sequence reads per decode step at `context` tokens, whole model."""
    cfg = _config(model_dir)
    heads = cfg.get("num_attention_heads") or 1
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    if cfg.get("kv_lora_rank"):  # MLA (deepseek/kimi): a compressed latent per token
        per_tok = (cfg["kv_lora_rank"] + cfg.get("qk_rope_head_dim", 0))
    else:
        per_tok = 2 * kv_heads * head_dim
    dtype = {"float32": 4, "float16": 2, "bfloat16": 2}.get(cfg.get("torch_dtype", "float16"), 2)
    return per_tok * (cfg.get("num_hidden_layers") or 1) * context * dtype


def ceiling(model_dir: Path, rank_hosts: list[str], sharding: str, bandwidth_gbs: dict[str, float], *,
            prompt_tokens: int, gen_tokens: int, concurrency: int) -> dict:
    """Aggregate decode tok/s ceiling for `concurrency` streams on these ranks (host per rank)."""
    world = len(rank_hosts)
    weights = rank_bytes(model_dir, world, sharding)
    kv = kv_bytes_per_token(model_dir, prompt_tokens + gen_tokens / 2) * concurrency
    per_host: Counter = Counter()
    stage_times = []
    for r, host in enumerate(rank_hosts):
        kv_r = kv / world if sharding == "tensor" else kv * len(_stage_layers(model_dir, r, world)) / _n_layers(model_dir)
        per_host[host] += weights[r] + kv_r
        stage_times.append((weights[r] + kv_r, host))
    if sharding == "pipeline":
        # a token passes the stages in turn, so each stage has its host's bandwidth to itself
        step = sum(b / (bandwidth_gbs[h] * 1e9) for b, h in stage_times)
    else:
        step = max(per_host[h] / (bandwidth_gbs[h] * 1e9) for h in per_host)
    return {"bytes_per_token": {h: round(b) for h, b in per_host.items()},
            "ceiling_tok_s": concurrency / step}


def _n_layers(model_dir: Path) -> int:
    return _config(model_dir).get("num_hidden_layers") or 1


def _stage_layers(model_dir: Path, r: int, world: int) -> range:
    n = _n_layers(model_dir)
    return range(r * n // world, (r + 1) * n // world)
