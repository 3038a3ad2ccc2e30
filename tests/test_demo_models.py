"""Demo models: deterministic, loadable by mlx-lm, with a working chat template and a safe cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import demo_models as dm

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(dm.DEMO_MODELS)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_digests(d: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each demo model (tiny, float32) generated twice into separate directories."""
    out = {}
    for name in NAMES:
        a = dm.generate(name, tmp_path_factory.mktemp("a") / name)
        b = dm.generate(name, tmp_path_factory.mktemp("b") / name)
        out[name] = (a, b)
    return out


@pytest.fixture(scope="module")
def loaded(generated):
    import mlx_lm

    return {name: mlx_lm.load(str(a)) for name, (a, _) in generated.items()}


@pytest.mark.parametrize("name", NAMES)
def test_generation_is_byte_identical(generated, name):
    a, b = generated[name]
    da, db = _file_digests(a), _file_digests(b)
    assert da == db
    shards = [f for f in da if f.endswith(".safetensors")]
    assert len(shards) >= 2, "layered models are written in >= 2 shards (pipeline load path)"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "model.safetensors.index.json"):
        assert f in da


def test_tokenizer_is_deterministic_and_byte_complete():
    from tokenizers import Tokenizer

    tj = dm.tokenizer_json(2048)
    dm.tokenizer_json.cache_clear()
    assert dm.tokenizer_json(2048) == tj  # retrained from scratch
    tok = Tokenizer.from_str(tj)
    assert tok.get_vocab_size() == 2048
    text = 'naïve 東京 🚀 {"a": [1, 2.5, true, null], "b": "x\\"y"} \x00\x07\t\n end'
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    for t in dm.SPECIAL_TOKENS + dm.MARKUP_TOKENS:
        assert tok.token_to_id(t) is not None


@pytest.mark.parametrize("name", NAMES)
def test_index_covers_every_tensor(generated, name):
    import mlx.core as mx

    d = generated[name][0]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    seen, total = {}, 0
    for shard in sorted(set(weight_map.values())):
        tensors = mx.load(str(d / shard))
        for k, v in tensors.items():
            seen[k] = shard
            total += v.nbytes
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total
    assert set(weight_map.values()) == {p.name for p in d.glob("model*.safetensors")}


@pytest.mark.parametrize("size", dm.SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_config_divides_for_tp_and_pp(name, size):
    cfg = dm.model_config(name, size=size)
    for n in (1, 2, 4):
        assert cfg["num_attention_heads"] % n == 0
        assert cfg["num_key_value_heads"] % n == 0
    assert cfg["num_hidden_layers"] % 2 == 0
    assert all(0 <= i < cfg["vocab_size"] for i in cfg["eos_token_id"])
    if cfg["model_type"] == "kimi_k2":
        assert cfg["n_routed_experts"] >= 4 and cfg["num_experts_per_tok"] == 2
        assert 1 <= cfg["first_k_dense_replace"] < cfg["num_hidden_layers"]  # dense + MoE layers


@pytest.mark.parametrize("name", NAMES)
def test_loads_and_generates(loaded, generated, name):
    import mlx_lm

    model, tok = loaded[name]
    cfg = json.loads((generated[name][0] / "config.json").read_text())
    assert cfg["model_type"] == {"demo-llama": "llama", "demo-qwen3": "qwen3", "demo-kimi": "kimi_k2"}[name]
    assert tok.vocab_size == cfg["vocab_size"]
    assert tok.eos_token_id in cfg["eos_token_id"]
    from mlx_lm.generate import generate_step
    import mlx.core as mx

    prompt = mx.array(tok.encode("The quick brown fox jumps over the lazy dog."))
    ids = [int(t) for (t, _), _ in zip(generate_step(prompt, model), range(8))]
    assert len(ids) == 8 and len(set(ids)) > 1
    text = mlx_lm.generate(model, tok, "Hello, world!", max_tokens=8)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("name", NAMES)
def test_one_rank_shard(generated, name):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tok = mlx_lm.load(str(generated[name][0]))
    prompt = mx.array(tok.encode("Tensor parallel, one rank."))
    before = [int(t) for (t, _), _ in zip(generate_step(prompt, model), range(6))]
    assert hasattr(model, "shard")
    model.shard(mx.distributed.init())
    after = [int(t) for (t, _), _ in zip(generate_step(prompt, model), range(6))]
    assert before == after


def test_chat_template_with_tools(loaded):
    _, tok = loaded["demo-llama"]
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        },
    }]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text.startswith(dm.BOS + "<|im_start|>system\nYou are terse.\n\n# Tools")
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1

    # A full tool round trip: assistant tool call, tool result, then the next prompt.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        ]},
        {"role": "tool", "content": '{"temp_c": 21}'},
    ]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n")

    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert ids[0] == tok.convert_tokens_to_ids(dm.BOS)
    assert tok.convert_tokens_to_ids(dm.IM_END) in ids
    # Without tools, no tool preamble; list-of-parts content is accepted.
    plain = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        add_generation_prompt=False, tokenize=False,
    )
    assert plain == dm.BOS + "<|im_start|>user\nhi<|im_end|>\n"
    # mlx-lm recognises the tool-call format.
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    assert tok.decode(tok.encode("<tool_call>", add_special_tokens=False)) == "<tool_call>"


def test_ensure_caches_and_regenerates_on_spec_change(tmp_path):
    d = dm.ensure("demo-qwen3", tmp_path)
    assert d == tmp_path / "demo-qwen3-float32-tiny"
    assert (d / dm.MARKER).read_text().strip() == dm.spec_hash("demo-qwen3")
    mtimes = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert dm.ensure("demo-qwen3", tmp_path) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == mtimes
    # A marker from another spec means stale: regenerated in place, atomically.
    (d / dm.MARKER).write_text("something-else\n")
    assert dm.ensure("demo-qwen3", tmp_path) == d
    assert (d / dm.MARKER).read_text().strip() == dm.spec_hash("demo-qwen3")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [d.name]


def test_ensure_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EXOLAUNCH_CACHE", str(tmp_path))
    assert dm.cache_root() == tmp_path
    d = dm.ensure("demo-llama")
    assert d == tmp_path / "models" / "demo-llama-float32-tiny"


def test_ensure_concurrent_processes(tmp_path):
    cache = tmp_path / "cache"  # does not exist yet
    code = textwrap.dedent(f"""
        from runtime import demo_models as dm
        print(dm.ensure("demo-kimi", {str(cache)!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    dirs = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(dirs) == 1
    d = Path(dirs.pop())
    assert dm.is_complete(d, dm.spec_hash("demo-kimi"))
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [d.name]  # no temp dirs left
    # Another process, the same bytes.
    here = dm.generate("demo-kimi", tmp_path / "here")
    theirs = _file_digests(d)
    theirs.pop(dm.MARKER)
    assert theirs == _file_digests(here)


def test_cli_out(tmp_path, capsys):
    assert dm.main(["demo-llama", "--out", str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        dm.main(["demo-nope"])
