"""Tensor parallelism for any mlx-lm model, split evenly or not (what mlx-lm's shard() covers
for 24 of its architectures, and only when everything divides by the rank count).

    shard_model(model, group, model_id)   # in place, after a lazy mlx_lm load, before mx.eval

What it recognizes, module by module (plain nn.Linear or any quantized linear mlx-lm loads):
- attention: a module with a query-head count (n_heads, num_heads, ...) and q/k/v projections
  (q_proj/k_proj/v_proj, wq/wk/wv, or a fused [Q|K|V] qkv_proj / c_attn) plus an output projection
  (o_proj, wo, out_proj, c_proj). Rank r takes whole KV-head groups (runtime.contract.split_sizes:
  9 heads / 3 KV heads on 2 ranks -> 2 + 1 KV heads with 6 + 3 query heads): q/k/v rows (column
  split), the output projection's matching input columns (row split, all-reduced, bias added
  once). Head counts are updated; a norm over all heads at once (olmo2's q_norm) becomes a
  distributed RMSNorm; a per-head norm stays.
- MLP: gate/up/down (gate_proj/up_proj/down_proj, w1/w3/w2), fused gate_up_proj, c_fc/c_proj,
  fc1/fc2. Widths split in whole quantization groups when quantized.
- MoE: a module holding a SwitchGLU / SwitchMLP: every expert's columns split the same way, its
  shared experts too, no collective inside; one all-reduce of the block's output.
Anything else with weights inside the decoder layers (other than a router) is refused with the
module's path and class: a wrong split would silently produce garbage.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from runtime.contract import ModelError, split_sizes

Q_HEADS = ("n_heads", "num_heads", "num_attention_heads", "n_head")
KV_HEADS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads", "n_kv_head")
# (q, k, v, out) or (fused qkv, out): the layouts whose rows are [Q heads | K heads | V heads]
ATTENTION = (("q_proj", "k_proj", "v_proj", "o_proj"), ("wq", "wk", "wv", "wo"),
             ("q_proj", "k_proj", "v_proj", "out_proj"), ("qkv_proj", "o_proj"), ("c_attn", "c_proj"))
# (column-split parts..., row-split) ; a single column name with 2 segments is a fused gate_up
MLPS = ((("gate_proj", "up_proj"), "down_proj"), (("w1", "w3"), "w2"), (("gate_up_proj",), "down_proj"),
        (("c_fc",), "c_proj"), (("fc1",), "fc2"), (("dense_h_to_4h",), "dense_4h_to_h"))
FUSED = {"gate_up_proj": 2}
REPLICATED = ("gate", "router", "shared_expert_gate", "shared_experts_gate")  # routers stay whole


def _is_linear(m) -> bool:
    return isinstance(m, nn.Module) and "weight" in m and m["weight"].ndim in (2, 3) and \
        type(m).__name__.endswith("Linear")


def _quant(m) -> tuple[int, int] | None:
    """(bits, group_size) of a quantized linear, None for a plain one."""
    return (m.bits, m.group_size) if "scales" in m else None


def _cut_rows(m: nn.Module, ranges: list[tuple[int, int]]) -> None:
    """Keep output rows `ranges` (concatenated): a column split. Quantization runs along the
    input, so any rows can be cut."""
    for k in ("weight", "scales", "biases", "bias"):
        a = m.get(k) if k in m else None
        if a is None:
            continue
        axis = a.ndim - 1 if k == "bias" else a.ndim - 2
        parts = [mx.take(a, mx.arange(s, e), axis=axis) for s, e in ranges]
        m[k] = mx.contiguous(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis))


def _cut_cols(m: nn.Module, start: int, stop: int, name: str) -> None:
    """Keep input columns [start, stop): a row split (the bias is the caller's business)."""
    q = _quant(m)
    if q is None:
        m["weight"] = mx.contiguous(m["weight"][..., start:stop])
        return
    bits, gs = q
    if start % gs or stop % gs:
        raise ModelError(f"{name}: input columns {start}:{stop} do not fall on quantization groups of {gs}.")
    m["weight"] = mx.contiguous(m["weight"][..., start * bits // 32:stop * bits // 32])
    for k in ("scales", "biases"):
        if k in m and m[k] is not None:
            m[k] = mx.contiguous(m[k][..., start // gs:stop // gs])


def _width_split(total: int, layer: nn.Module, world: int, name: str) -> list[int]:
    q = _quant(layer)
    unit = q[1] if q and total % q[1] == 0 else 1
    if total // unit < world:
        raise ModelError(f"{name}: width {total} cannot be split over {world} ranks in units of {unit}.")
    return split_sizes(total, world, unit)


def _span(sizes: list[int], r: int) -> tuple[int, int]:
    return sum(sizes[:r]), sum(sizes[:r + 1])


class RowParallel(nn.Module):
    """A row-split linear: this rank's input columns, partial outputs summed over the group,
    the bias (kept whole) added once."""

    def __init__(self, inner: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.bias = inner.get("bias") if "bias" in inner else None
        if "bias" in inner:
            del inner["bias"]
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(self.inner(x), group=self.group)
        return y if self.bias is None else y + self.bias


class AllSum(nn.Module):
    """A block whose every weight is split (an MoE layer): its output summed over the group."""

    def __init__(self, inner: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):  # (y, aux) blocks: only the activations are partial
            return (mx.distributed.all_sum(out[0], group=self.group), *out[1:])
        return mx.distributed.all_sum(out, group=self.group)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split across the group (olmo2 normalizes all query heads at once):
    the sum of squares is all-reduced, each rank scales its own slice."""

    def __init__(self, weight: mx.array, eps: float, dims: int, group: mx.distributed.Group):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.dims = dims
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        ss = mx.distributed.all_sum(mx.sum(x32 * x32, axis=-1, keepdims=True), group=self.group)
        return (self.weight * (x32 * mx.rsqrt(ss / self.dims + self.eps)).astype(x.dtype)).astype(x.dtype)


class Sharder:
    def __init__(self, model: nn.Module, group: mx.distributed.Group, model_id: str):
        self.model, self.group, self.model_id = model, group, model_id
        self.N, self.r = group.size(), group.rank()
        self.done: set[int] = set()  # ids of the linears split (or deliberately left whole)
        self.counts = {"attention": 0, "mlp": 0, "moe": 0}

    def _row_inplace(self, layer: nn.Module, sizes: list[int], name: str) -> None:
        """Row split with no collective (inside an MoE block): the bias on rank 0 only."""
        _cut_cols(layer, *_span(sizes, self.r), name)
        if "bias" in layer and self.r:
            layer["bias"] = mx.zeros_like(layer["bias"])
        self.done.add(id(layer))

    def _row(self, parent: nn.Module, key: str, sizes: list[int], name: str) -> None:
        layer = parent[key]
        _cut_cols(layer, *_span(sizes, self.r), name)
        self.done.add(id(layer))
        setattr(parent, key, RowParallel(layer, self.group))

    def _cols(self, layer: nn.Module, sizes: list[int], segments: int = 1) -> None:
        seg = layer["weight"].shape[-2] // segments
        s, e = _span(sizes, self.r)
        _cut_rows(layer, [(i * seg + s, i * seg + e) for i in range(segments)])
        self.done.add(id(layer))

    # -- attention
    def attention(self, name: str, m: nn.Module) -> bool:
        qa = next((a for a in Q_HEADS if isinstance(getattr(m, a, None), int)), None)
        names = next((p for p in ATTENTION if all(_is_linear(m.get(k) if k in m else None) for k in p)), None)
        if qa is None or names is None:
            return False
        ka = next((a for a in KV_HEADS if isinstance(getattr(m, a, None), int)), None)
        H = getattr(m, qa)
        K = getattr(m, ka) if ka else H
        if K < self.N or H % K:
            raise ModelError(f"{self.model_id}: {name} ({type(m).__name__}): {H} heads / {K} KV heads cannot be "
                             f"split over {self.N} ranks (every rank needs a whole KV head). "
                             "Fix: fewer ranks, or --sharding pipeline.")
        g = H // K
        kv = split_sizes(K, self.N)
        k0, k1 = _span(kv, self.r)
        *qkv, out = names
        rows = m[qkv[0]]["weight"].shape[-2]
        hd = rows // (H + 2 * K) if len(qkv) == 1 else rows // H
        q_rows = (k0 * g * hd, k1 * g * hd)
        kv_rows = (k0 * hd, k1 * hd)
        if len(qkv) == 1:
            _cut_rows(m[qkv[0]], [q_rows, (H * hd + kv_rows[0], H * hd + kv_rows[1]),
                                  ((H + K) * hd + kv_rows[0], (H + K) * hd + kv_rows[1])])
        else:
            _cut_rows(m[qkv[0]], [q_rows])
            _cut_rows(m[qkv[1]], [kv_rows])
            _cut_rows(m[qkv[2]], [kv_rows])
        self.done.update(id(m[k]) for k in qkv)
        self._row(m, out, [c * g * hd for c in kv], f"{name}.{out}")
        for key, child in list(m.children().items()):
            if not isinstance(child, nn.Module) or "Norm" not in type(child).__name__ or "weight" not in child:
                continue
            width = child["weight"].shape[-1]
            if width == hd or child["weight"].ndim != 1:
                if child["weight"].ndim != 1:
                    raise ModelError(f"{self.model_id}: {name}.{key} ({type(child).__name__}): a per-head norm "
                                     "exolaunch's sharder cannot split. Fix: --sharding pipeline.")
                continue
            lo, hi = (q_rows if width == H * hd else kv_rows if width == K * hd else (None, None))
            if lo is None or not isinstance(child, nn.RMSNorm):
                raise ModelError(f"{self.model_id}: {name}.{key} ({type(child).__name__}, width {width}): a norm "
                                 "across heads exolaunch's sharder cannot split. Fix: --sharding pipeline.")
            setattr(m, key, ShardedRMSNorm(mx.contiguous(child["weight"][lo:hi]), child.eps, width, self.group))
        setattr(m, qa, (k1 - k0) * g)
        if ka:
            setattr(m, ka, k1 - k0)
        for a, v in vars(m).items():  # a head count this sharder does not know about
            if "head" in a and a not in (qa, ka, "head_dim") and isinstance(v, int) and v in (H, K) and v != g:
                raise ModelError(f"{self.model_id}: {name} ({type(m).__name__}) keeps {a}={v}, which exolaunch's "
                                 "sharder does not know how to update. Fix: --sharding pipeline.")
        self.counts["attention"] += 1
        return True

    # -- dense MLP
    def mlp(self, name: str, m: nn.Module, inplace: bool = False) -> bool:
        for cols, row in MLPS:
            if all(_is_linear(m.get(k) if k in m else None) and m[k]["weight"].ndim == 2 for k in (*cols, row)):
                break
        else:
            return False
        down = m[row]
        width = down["weight"].shape[-1] * 32 // _quant(down)[0] if _quant(down) else down["weight"].shape[-1]
        sizes = _width_split(width, down, self.N, f"{self.model_id}: {name}.{row}")
        for c in cols:
            self._cols(m[c], sizes, FUSED.get(c, 1))
        if inplace:
            self._row_inplace(down, sizes, f"{name}.{row}")
        else:
            self._row(m, row, sizes, f"{name}.{row}")
        self.counts["mlp"] += 1
        return True

    # -- mixture of experts
    def moe(self, name: str, m: nn.Module) -> bool:
        switches = [(k, c) for k, c in m.children().items()
                    if isinstance(c, nn.Module) and type(c).__name__ in ("SwitchGLU", "SwitchMLP")]
        if not switches:
            return False
        for key, sw in switches:
            cols, row = (("gate_proj", "up_proj"), "down_proj") if "gate_proj" in sw else (("fc1",), "fc2")
            down = sw[row]
            width = down.input_dims if hasattr(down, "input_dims") else down["weight"].shape[-1]
            sizes = _width_split(width, down, self.N, f"{self.model_id}: {name}.{key}.{row}")
            for c in cols:
                self._cols(sw[c], sizes)
            self._row_inplace(down, sizes, f"{name}.{key}.{row}")
        for key, child in m.children().items():  # shared experts: split, reduced with the rest
            if key in REPLICATED:
                self.done.add(id(child))
            if key in REPLICATED or key in dict(switches):
                continue
            subs = child if isinstance(child, list) else [child]
            for i, c in enumerate(subs):
                if isinstance(c, nn.Module):
                    self.mlp(f"{name}.{key}" + (f".{i}" if isinstance(child, list) else ""), c, inplace=True)
        self.counts["moe"] += 1
        return True

    def run(self) -> dict:
        modules = dict(self.model.named_modules())
        for name, m in sorted(modules.items(), key=lambda kv: kv[0].count(".")):
            if id(m) in self.done or any(id(c) in self.done for c in _linears(m)):
                continue
            if self.moe(name, m):
                parent, key = _parent(self.model, name)
                _set(parent, key, AllSum(m, self.group))
            else:
                self.attention(name, m) or self.mlp(name, m)
        self._refuse_leftovers()
        return self.counts

    def _refuse_leftovers(self) -> None:
        layers = _decoder_layers(self.model)
        if not layers:
            raise ModelError(f"{self.model_id}: {type(self.model).__name__}: no decoder layers found "
                             "(model.layers / model.model.layers). Fix: --sharding pipeline.")
        for i, layer in enumerate(layers):
            for name, m in layer.named_modules():
                if _is_linear(m) and id(m) not in self.done and name.rsplit(".", 1)[-1] not in REPLICATED:
                    raise ModelError(f"{self.model_id}: layers.{i}.{name} ({type(m).__name__}): exolaunch's "
                                     "sharder does not recognize the module it belongs to, so cannot split it. "
                                     "Fix: --sharding pipeline.")


def _linears(m: nn.Module) -> list:
    return [c for _, c in m.named_modules() if _is_linear(c)] if isinstance(m, nn.Module) else []


def _decoder_layers(model: nn.Module) -> list:
    for path in ("layers", "model.layers", "language_model.model.layers", "model.language_model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, list) and obj:
            return obj
    return []


def _parent(model: nn.Module, path: str):
    parts = path.split(".")
    obj = model
    for p in parts[:-1]:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    return obj, parts[-1]


def _set(parent, key: str, value) -> None:
    if isinstance(parent, list):
        parent[int(key)] = value
    else:
        setattr(parent, key, value)


def shard_model(model: nn.Module, group: mx.distributed.Group, model_id: str = "model") -> dict:
    """Split `model` in place over `group` (any head and width counts a whole KV head per rank
    allows). Returns how many attention, MLP and MoE blocks were split."""
    return Sharder(model, group, model_id).run()
