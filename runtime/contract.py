"""What the control plane (launcher/) and the data plane (runtime/) must agree on.

Both planes import this module; it imports only the standard library (and, inside functions,
the demo-model generator and huggingface-hub), so `exolaunch plan` and `doctor` never load mlx.

- the environment variables the launcher sets on ranks and the ranks read;
- backends, default ports and the control-port rule;
- model references: what a MODEL argument names (demo model, local directory, hub repo id) and
  how it resolves to a local mlx-lm directory;
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
ENV_HOST = "EXOLAUNCH_HOST"
ENV_BACKEND = "EXOLAUNCH_BACKEND"
ENV_CONTROL_FD = "EXOLAUNCH_CONTROL_FD"  # the agent's pipe a rank reports readiness on
ENV_CONTROL = "EXOLAUNCH_CONTROL"  # rank 0's ip:port for the step channel (runtime/control.py)
ENV_API_KEY = "EXOLAUNCH_API_KEY"  # in the environment, never on a command line
ENV_CACHE = "EXOLAUNCH_CACHE"  # where demo models are generated
ENV_MODELS = "EXOLAUNCH_MODELS"  # per host: ROOT/<name> is where `pull` puts a model
ENV_SHARD_HEAD = "EXOLAUNCH_SHARD_HEAD"  # "0": keep lm_head whole on every rank
ENV_SWITCH_INTERVAL = "EXOLAUNCH_SWITCH_INTERVAL"  # rank 0's GIL switch interval, seconds

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


def control_address(rank0_ips: list[str] | tuple[str, ...], data_port: int) -> tuple[str, int]:
    """(host, port) of the step channel: rank 0's first data-plane address."""
    return (rank0_ips[0] if rank0_ips else "127.0.0.1"), control_port(data_port)


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
    """What a MODEL argument names. kind: demo (name, size), dir (path) or hub (repo id)."""

    kind: Literal["demo", "dir", "hub"]
    name: str
    size: str | None = None
    path: Path | None = None


def is_repo_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def classify_model(model: str) -> ModelRef | None:
    """A demo model (`demo-llama`, `demo-kimi:tiny`), an existing directory, or something shaped
    like a hub repo id (owner/name); None for anything else (e.g. a catalogue name)."""
    from runtime import demo_models

    base, colon, size = model.partition(":")
    if base in demo_models.DEMO_MODELS:
        return ModelRef("demo", base, size if colon else None)
    path = Path(model).expanduser()
    if path.exists():
        return ModelRef("dir", path.name, path=path)
    if is_repo_id(model):
        return ModelRef("hub", model)
    return None


HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


def resolve_model(model: str) -> tuple[Path, str]:
    """(local directory, the id the API serves it under). Demo models are generated on first
    use; hub repos are downloaded with huggingface-hub (a reachable hub is needed)."""
    from runtime import demo_models

    ref = classify_model(model)
    if ref is None:
        raise ModelError(f"model {model!r}: no such directory, demo model ({', '.join(demo_models.DEMO_MODELS)}) "
                         "or Hugging Face repo id (owner/name).")
    if ref.kind == "demo":
        return demo_models.ensure(ref.name, size="small" if ref.size is None else ref.size), model
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


# ---------------------------------------------------------------------------- config and sharding
def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def context_length(config: dict, default: int = 4096) -> int:
    for k in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions"):
        if isinstance(config.get(k), int):
            return config[k]
    return default


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
        if not (Path(path) / "model.safetensors.index.json").is_file():
            raise ModelError(f"{model_id}: pipeline sharding needs model.safetensors.index.json in {path} "
                             "(to load only each stage's layers). Fix: re-save the model with mlx_lm.convert.")
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers < world:
            raise ModelError(f"{model_id}: {layers} layers cannot be split into {world} pipeline stages.")
    else:
        raise ModelError(f"--sharding {sharding!r}: expected tensor or pipeline.")
