"""Model cards: what the planner needs to know about a model, from the catalogue or its config.

A card comes from one of:
  - configs/models.yaml, by short name (`kimi-k2`) or by its Hugging Face repo id
  - a demo model (`demo-llama`, `demo-kimi:tiny`): derived from runtime.demo_models.model_config
  - a .gguf file: imported once into the model cache (runtime.gguf), then derived from that directory
  - a local mlx-lm directory, or an HF repo id already in the local Hugging Face cache:
    derived from config.json (+ model.safetensors.index.json for the bytes on disk)

Parameter counts for derived cards are counted from the config's shapes (count_params); bytes on
disk come from the safetensors index's metadata.total_size when there is one.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import re
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from launcher.errors import ConfigError

CATALOGUE_PATH = Path(__file__).resolve().parent.parent / "configs" / "models.yaml"
GB = 1e9
KV_BYTES = 2  # the KV cache is kept in bf16/fp16

# What mlx-lm 0.32 implements, by model_type (Model.shard -> tensor, PipelineMixin -> pipeline).
# Used for derived cards when mlx_lm cannot be imported to ask it directly.
_KNOWN_SHARDING = {
    "llama": ("tensor",), "qwen3": ("tensor",), "gpt_oss": ("tensor",), "qwen2": ("tensor", "pipeline"),
    "qwen3_moe": ("tensor", "pipeline"), "deepseek_v3": ("tensor", "pipeline"),
    "kimi_k2": ("tensor", "pipeline"), "glm4_moe": ("tensor", "pipeline"), "deepseek_v2": ("tensor", "pipeline"),
}


@dataclass(frozen=True)
class ModelCard:
    name: str
    repo: str | None
    architecture: str
    params_total: float            # parameters (not billions)
    params_active: float
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int | None = None
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    first_dense_layers: int = 0
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    vocab_size: int = 0
    tie_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: int = 0
    bits: float = 16.0
    group_size: int | None = None
    disk_bytes: float = 0.0
    context_length: int = 4096
    sharding: tuple[str, ...] = ("tensor", "pipeline")
    source: str = ""
    approx: tuple[str, ...] = ()
    path: str | None = None        # local directory, for derived cards
    alias_of: str | None = None     # catalogue aliases (deepseek-v3.1-8bit -> deepseek-v3.1)
    config: dict = field(default_factory=dict, hash=False, compare=False)

    # -- derived quantities

    @property
    def is_moe(self) -> bool:
        return self.experts > 0 and self.experts_per_token > 0

    @property
    def is_mla(self) -> bool:
        return bool(self.kv_lora_rank)

    @property
    def quantization(self) -> str:
        if self.bits >= 16:
            return "bf16" if self.bits == 16 else f"fp{int(self.bits)}"
        b = f"{self.bits:g}-bit"
        return b

    @property
    def bytes_per_param(self) -> float:
        """Effective bytes per parameter on disk (quantization scales and unquantized norms included)."""
        if self.disk_bytes and self.params_total:
            return self.disk_bytes / self.params_total
        return quant_bytes_per_param(self.bits, self.group_size)

    @property
    def embed_bytes(self) -> float:
        """Embedding table bytes (replicated by tensor parallel, kept by every pipeline stage)."""
        return self.vocab_size * self.hidden_size * self.bytes_per_param

    @property
    def head_bytes(self) -> float:
        return 0.0 if self.tie_embeddings else self.embed_bytes

    @property
    def replicated_bytes(self) -> float:
        """What every rank holds in full under both layouts: embeddings and lm_head."""
        return min(self.embed_bytes + self.head_bytes, self.disk_bytes)

    @property
    def layer_bytes(self) -> float:
        """Average bytes of one transformer layer."""
        return max(self.disk_bytes - self.replicated_bytes, 0.0) / max(self.layers, 1)

    def touched_fraction(self, batch: int = 1) -> float:
        """Fraction of the layer weights read per decode step for `batch` sequences.

        Dense: 1. MoE: the non-expert part always, the routed experts each with probability
        1 - (1 - k/E)^batch (uniform routing)."""
        if not self.is_moe:
            return 1.0
        rep_params = self.replicated_bytes / self.bytes_per_param if self.bytes_per_param else 0.0
        layer_params = max(self.params_total - rep_params, 1.0)
        e, k = self.experts, self.experts_per_token
        routed = (self.params_total - self.params_active) * e / max(e - k, 1)  # all routed experts
        routed = min(routed, layer_params)
        dense = layer_params - routed
        p = 1.0 - (1.0 - k / e) ** max(batch, 1)
        return (dense + routed * p) / layer_params

    def kv_bytes_per_token(self, tensor: int = 1, context: int | None = None) -> float:
        """KV cache bytes per token of context, all layers, on one rank of a tensor group of `tensor`.

        MLA caches the compressed latent (kv_lora_rank + rope dims), which tensor parallel
        replicates; GQA caches K and V per KV head, split across the tensor group. Sliding-window
        layers hold at most `sliding_window` tokens (scaled in when `context` is given)."""
        if self.is_mla:
            per_layer = (self.kv_lora_rank + (self.qk_rope_head_dim or 0)) * KV_BYTES
            return per_layer * self.layers
        hd = self.head_dim or self.hidden_size // max(self.heads, 1)
        kv = self.kv_heads / tensor if self.kv_heads % tensor == 0 else math.ceil(self.kv_heads / tensor)
        per_layer = 2 * kv * hd * KV_BYTES
        full = self.layers - self.sliding_layers
        sliding = self.sliding_layers
        if sliding and self.sliding_window and context:
            return per_layer * (full + sliding * min(1.0, self.sliding_window / context))
        return per_layer * self.layers

    def tp_config(self) -> dict:
        """The config.json fields runtime.contract.check_sharding reads (TENSOR_SPLIT_DIMS)."""
        if self.config:
            return self.config
        out = {"num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
               "num_hidden_layers": self.layers, "model_type": self.architecture}
        if self.intermediate_size:
            out["intermediate_size"] = self.intermediate_size
        if self.moe_intermediate_size:
            out["moe_intermediate_size"] = self.moe_intermediate_size
        if self.bits < 16 and self.group_size:  # uneven splits cut MLP columns in whole groups
            out["quantization"] = {"bits": self.bits, "group_size": self.group_size}
        return out


def quant_bytes_per_param(bits: float, group_size: int | None) -> float:
    """mlx affine quantization: `bits` per weight plus a 16-bit scale and bias per group."""
    if bits >= 16 or not group_size:
        return bits / 8
    return bits / 8 + 4 / group_size


# ----------------------------------------------------------------------------- counting


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg.get(k), bool):
            return cfg[k]
    return default


def count_params(cfg: dict) -> tuple[float, float]:
    """(total, active) parameters counted from a config.json's shapes (norms and biases ignored)."""
    h = _get(cfg, "hidden_size", default=0)
    L = _get(cfg, "num_hidden_layers", default=0)
    heads = _get(cfg, "num_attention_heads", default=1)
    kvh = _get(cfg, "num_key_value_heads", default=heads)
    vocab = _get(cfg, "vocab_size", default=0)
    hd = _get(cfg, "head_dim", default=h // max(heads, 1))
    inter = _get(cfg, "intermediate_size", default=4 * h)
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    if cfg.get("kv_lora_rank"):
        nope, rope = _get(cfg, "qk_nope_head_dim", default=128), _get(cfg, "qk_rope_head_dim", default=64)
        v = _get(cfg, "v_head_dim", default=nope)
        qr, kvr = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
        q = h * qr + qr * heads * (nope + rope) if qr else h * heads * (nope + rope)
        attn = q + h * (kvr + rope) + kvr * heads * (nope + v) + heads * v * h
    else:
        attn = h * heads * hd + 2 * h * kvh * hd + heads * hd * h
    e = _get(cfg, "n_routed_experts", "num_experts", "num_local_experts", default=0)
    k = _get(cfg, "num_experts_per_tok", "experts_per_token", default=0)
    if e and k:
        moe_inter = _get(cfg, "moe_intermediate_size", default=inter)
        shared = _get(cfg, "n_shared_experts", "num_shared_experts", default=0)
        dense_layers = _get(cfg, "first_k_dense_replace", default=0)
        moe_layers = L - dense_layers
        expert = 3 * h * moe_inter
        moe_layer = e * expert + shared * expert + h * e
        total = embed + L * attn + dense_layers * 3 * h * inter + moe_layers * moe_layer
        active = total - moe_layers * (e - k) * expert
        return float(total), float(active)
    total = embed + L * (attn + 3 * h * inter)
    return float(total), float(total)


# ----------------------------------------------------------------------------- loading


def _model_sharding(model_type: str) -> tuple[str, ...]:
    """Ask the installed mlx-lm which sharding the architecture implements, by reading its
    source: importing mlx_lm pulls in transformers (~1.5 s), which every `run` would pay."""
    try:
        root = Path(importlib.util.find_spec("mlx_lm").origin).parent
        src = (root / "models" / f"{_mlx_lm_remapping(root).get(model_type, model_type)}.py").read_text()
        out = []
        if re.search(r"^    def shard\(", src, re.M):
            out.append("tensor")
        if "PipelineMixin" in src:
            out.append("pipeline")
        return tuple(out)
    except Exception:
        return _KNOWN_SHARDING.get(model_type, ("tensor", "pipeline"))


@functools.lru_cache(maxsize=None)
def _mlx_lm_remapping(root: Path) -> dict:
    """mlx_lm.utils.MODEL_REMAPPING (model_type aliases), read from the file."""
    tree = ast.parse((root / "utils.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def card_from_config(cfg: dict, *, name: str, repo: str | None = None, path: str | None = None,
                     index: dict | None = None, source: str = "") -> ModelCard:
    """A card derived from config.json (and the safetensors index, when there is one)."""
    total, active = count_params(cfg)
    meta = (index or {}).get("metadata", {}) if isinstance(index, dict) else {}
    if isinstance(meta.get("total_parameters"), (int, float)) and meta["total_parameters"] > 0:
        ratio = active / total if total else 1.0
        total = float(meta["total_parameters"])
        active = total * ratio
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    bits = float(q.get("bits", 0) or 0)
    group = q.get("group_size")
    if not bits:
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        bits = 32.0 if "32" in dtype else 16.0
    disk = meta.get("total_size")
    approx: list[str] = []
    if not isinstance(disk, (int, float)) or disk <= 0:
        disk = total * quant_bytes_per_param(bits, group)
        approx.append("disk_gb")
    heads = int(_get(cfg, "num_attention_heads", default=1))
    types = cfg.get("layer_types") if isinstance(cfg.get("layer_types"), list) else []
    from runtime.contract import context_length

    return ModelCard(
        name=name, repo=repo, architecture=str(cfg.get("model_type", "unknown")),
        params_total=total, params_active=active,
        layers=int(_get(cfg, "num_hidden_layers", default=1)), hidden_size=int(_get(cfg, "hidden_size", default=0)),
        heads=heads, kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=_get(cfg, "head_dim"), intermediate_size=_get(cfg, "intermediate_size"),
        moe_intermediate_size=_get(cfg, "moe_intermediate_size"),
        experts=int(_get(cfg, "n_routed_experts", "num_experts", "num_local_experts", default=0)),
        experts_per_token=int(_get(cfg, "num_experts_per_tok", "experts_per_token", default=0)),
        shared_experts=int(_get(cfg, "n_shared_experts", default=0)),
        first_dense_layers=int(_get(cfg, "first_k_dense_replace", default=0)),
        kv_lora_rank=_get(cfg, "kv_lora_rank"), qk_rope_head_dim=_get(cfg, "qk_rope_head_dim"),
        vocab_size=int(_get(cfg, "vocab_size", default=0)), tie_embeddings=bool(cfg.get("tie_word_embeddings")),
        sliding_window=_get(cfg, "sliding_window") if types else None,
        sliding_layers=sum(1 for t in types if t == "sliding_attention"),
        bits=bits, group_size=group, disk_bytes=float(disk), context_length=context_length(cfg),
        sharding=_model_sharding(str(cfg.get("model_type", ""))), source=source,
        approx=tuple(approx), path=path, config=cfg,
    )


def card_from_dir(path: Path, *, name: str | None = None, repo: str | None = None) -> ModelCard:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: not an mlx-lm model directory (no config.json). "
                          "Fix: pass a directory holding config.json and the safetensors.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_file}: cannot read it: {e}. Fix: re-download the model.") from None
    index = None
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            index = json.loads(idx.read_text())
        except (OSError, ValueError):
            index = None
    if index is None or not index.get("metadata", {}).get("total_size"):
        files = list(path.glob("*.safetensors"))
        if files:
            index = {"metadata": {**(index or {}).get("metadata", {}),
                                  "total_size": sum(f.stat().st_size for f in files)}}
    return card_from_config(cfg, name=name or path.name, repo=repo, path=str(path), index=index,
                            source=f"{cfg_file} (derived)")


def _card_from_entry(name: str, e: dict, label: str) -> ModelCard:
    def need(k):
        if k not in e:
            raise ConfigError(f"{label}: models.{name}: missing {k}. Fix: add it (see the file's header).")
        return e[k]

    q = e.get("quantization") or {}
    approx = e.get("approx") or ()
    if approx is True:
        approx = ("all",)
    return ModelCard(
        name=name, repo=e.get("repo"), architecture=str(need("architecture")),
        params_total=float(need("params_total_b")) * 1e9, params_active=float(e.get("params_active_b", e["params_total_b"])) * 1e9,
        layers=int(need("layers")), hidden_size=int(need("hidden_size")), heads=int(need("heads")),
        kv_heads=int(e.get("kv_heads", e["heads"])), head_dim=e.get("head_dim"),
        intermediate_size=e.get("intermediate_size"), moe_intermediate_size=e.get("moe_intermediate_size"),
        experts=int(e.get("experts", 0)), experts_per_token=int(e.get("experts_per_token", 0)),
        shared_experts=int(e.get("shared_experts", 0)), first_dense_layers=int(e.get("first_dense_layers", 0)),
        kv_lora_rank=e.get("kv_lora_rank"), qk_rope_head_dim=e.get("qk_rope_head_dim"),
        vocab_size=int(e.get("vocab_size", 0)), tie_embeddings=bool(e.get("tie_embeddings", False)),
        sliding_window=e.get("sliding_window"), sliding_layers=int(e.get("sliding_layers", 0)),
        bits=float(q.get("bits", 16)), group_size=q.get("group_size"), disk_bytes=float(need("disk_gb")) * GB,
        context_length=int(e.get("context_length", 4096)), sharding=tuple(e.get("sharding", ("tensor", "pipeline"))),
        source=" ".join(str(e.get("source", "")).split()), approx=tuple(approx),
    )


def demo_card(spec: str) -> ModelCard:
    """Card of a demo model `demo-llama[:size]` (default size small, float32, as `run` serves it)."""
    from runtime import demo_models

    name, _, size = spec.partition(":")
    size = size or "small"
    cfg = demo_models.model_config(name, size=size)
    total, active = count_params(cfg)
    return card_from_config(cfg, name=spec, path=None, index={"metadata": {"total_size": total * 4}},
                            source=f"runtime.demo_models.model_config({name!r}, size={size!r})")


_CACHE: dict[str, dict[str, ModelCard]] = {}


def load_catalogue(path: str | os.PathLike | None = None) -> dict[str, ModelCard]:
    """Short name -> card, in file order (aliases included)."""
    p = Path(path) if path else CATALOGUE_PATH
    key = str(p)
    if key in _CACHE:
        return _CACHE[key]
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read the model catalogue: {e}. Fix: restore configs/models.yaml.") from None
    models = (data or {}).get("models") or {}
    out: dict[str, ModelCard] = {}
    aliases = {}
    for name, e in models.items():
        if not isinstance(e, dict):
            raise ConfigError(f"{p}: models.{name}: expected a mapping. Fix: see the file's header.")
        if "alias" in e:
            aliases[name] = e["alias"]
        elif "demo" in e:
            out[name] = demo_card(e["demo"])
        else:
            out[name] = _card_from_entry(name, e, str(p))
    for name, target in aliases.items():
        if target not in out:
            raise ConfigError(f"{p}: models.{name}: alias of unknown model {target!r}.")
        out[name] = replace(out[target], name=name, alias_of=target)
    _CACHE[key] = out
    return out


def canonical_names(catalogue: dict[str, ModelCard]) -> list[str]:
    """Names that are not aliases (one row per model in `exolaunch models`)."""
    return [n for n, c in catalogue.items() if c.alias_of is None]


def resolve_card(model: str | ModelCard, catalogue: dict[str, ModelCard] | None = None) -> ModelCard:
    """A card for MODEL: catalogue name, catalogue repo id, demo model, local directory, or HF repo id
    whose config.json is already in the local Hugging Face cache."""
    if isinstance(model, ModelCard):
        return model
    from runtime import demo_models
    from runtime.contract import classify_model

    cat = catalogue if catalogue is not None else load_catalogue()
    if model in cat:
        return cat[model]
    for c in cat.values():
        if c.repo and c.repo.lower() == model.lower():
            return c
    ref = classify_model(model)
    if ref is not None and ref.kind == "demo":
        try:
            return demo_card(model)
        except ValueError as e:
            raise ConfigError(f"model {model!r}: {e}. Fix: use a size of {', '.join(demo_models.SIZES)}.") from None
    if ref is not None and ref.kind == "dir":
        return card_from_dir(ref.path)
    if ref is not None and ref.kind == "gguf":
        from runtime.contract import ModelError, resolve_model

        try:
            return card_from_dir(resolve_model(model)[0], name=ref.name)
        except ModelError as e:
            raise ConfigError(str(e)) from None
    if ref is not None and ref.kind == "hub":
        local = _hf_cached_dir(model)
        if local is not None:
            return card_from_dir(local, name=model, repo=model)
        raise ConfigError(
            f"model {model!r}: not in the catalogue and its config.json is not in the local Hugging Face "
            "cache, so its size is unknown. Fix: `exolaunch pull` it (or huggingface-cli download "
            f"{model} --include '*.json'), pass a local directory, or use a catalogue name "
            "(`exolaunch models`).")
    import difflib

    close = difflib.get_close_matches(model, list(cat), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"model {model!r}: no such catalogue name{hint}, demo model, directory or repo id. "
                      "Fix: see `exolaunch models`.")


def _hf_cached_dir(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json")
    except Exception:
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found).parent
    return None
