"""What a model says about itself without loading it: size on disk, a digest, the parameter
count and quantization level (from the safetensors headers and config.json), and its
tokenizer's chat template and end-of-sequence tokens. Stdlib only, so rank 0's API can ask
without touching mlx.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFacts:
    size: int = 0  # bytes on disk, every file of the directory
    digest: str = ""  # sha256 over file names, sizes and config.json
    params: int = 0  # parameters, counting quantized weights at their unpacked size
    level: str = "unknown"  # "Q4", "BF16", ...
    config: dict[str, Any] = field(default_factory=dict)
    mtime: float = 0.0  # the directory's


def human_count(n: int) -> str:
    """1234567 -> "1.23M" (how Ollama shows parameter sizes)."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.2f}K"
    return str(n)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file ({} if unreadable): tensor names, dtypes, shapes."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return {}
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}


def model_facts(path: str | None, model_id: str) -> ModelFacts:
    """Facts about the model directory at `path`; without one, only a digest of the id."""
    if path is None or not Path(path).is_dir():
        return ModelFacts(digest=hashlib.sha256(model_id.encode()).hexdigest())
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        mtime = 0.0
    return _directory_facts(str(path), mtime)


@functools.lru_cache(maxsize=8)
def _directory_facts(path_str: str, mtime: float) -> ModelFacts:
    """Walks the directory and reads every safetensors header: cached per mtime."""
    path = Path(path_str)
    size = 0
    files: list[tuple[str, int]] = []
    for root, _, names in os.walk(path):
        for name in names:
            p = Path(root) / name
            try:
                st = p.stat()
            except OSError:
                continue
            size += st.st_size
            files.append((str(p.relative_to(path)), st.st_size))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    params = 0
    dtype = None
    for st in sorted(path.glob("*.safetensors")):
        header = safetensors_header(st)
        names = set(header)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            # mlx quantization stores .scales / .biases beside a packed uint32 .weight
            if name.endswith((".scales", ".biases")) and \
                    name.rsplit(".", 1)[0] + ".weight" in names:
                continue
            numel = 1
            for d in info.get("shape", []):
                numel *= int(d)
            if info.get("dtype") == "U32" and bits and \
                    name.rsplit(".", 1)[0] + ".scales" in names:
                numel = numel * 32 // int(bits)
            elif dtype is None and info.get("dtype") in ("F32", "F16", "BF16"):
                dtype = info["dtype"]
            params += numel
    h = hashlib.sha256()
    for rel, n in sorted(files):
        h.update(f"{rel}\0{n}\n".encode())
    h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    if bits:
        level = f"Q{bits}"
    else:
        level = dtype or str(config.get("torch_dtype") or "unknown").upper().replace(
            "BFLOAT16", "BF16").replace("FLOAT16", "F16").replace("FLOAT32", "F32")
    return ModelFacts(size=size, digest=h.hexdigest(), params=params, level=level,
                      config=config, mtime=mtime)


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template source ("" if it has none)."""
    tpl = getattr(tokenizer, "chat_template", None)
    if tpl is None:
        tpl = getattr(getattr(tokenizer, "_tokenizer", None), "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), "")
    if isinstance(tpl, list):  # [{"name", "template"}]
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict)), "")
    return tpl if isinstance(tpl, str) else ""


def eos_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's end-of-sequence tokens as text, in id order."""
    out = []
    for t in sorted(getattr(tokenizer, "eos_token_ids", None) or []):
        try:
            s = tokenizer.convert_ids_to_tokens(int(t))
        except Exception:
            s = None
        if isinstance(s, str) and s:
            out.append(s)
    return out
