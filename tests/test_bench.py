"""exolaunch bench: sweep config, prompts, roofline arithmetic, and real sweeps on 1 and 2 local
ranks (every output file, sane values, resume after a kill)."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import statistics
import subprocess
import time

import numpy as np
import psutil
import pytest

from launcher.bench import measure, records, roofline
from launcher.blas import find_openblas
from launcher.bench.sweep import load_sweep
from launcher.errors import ConfigError
from tests.launch_helpers import env_for_tests, exolaunch_argv, run, ROOT


# -- sweep config ------------------------------------------------------------------------------

def test_sweep_from_yaml_and_flags(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("models: [demo-llama:tiny]\nranks: [1, 2]\nconcurrency: [1, 4]\nrepeats: 2\n")
    s = load_sweep(f, {"gen_tokens": [16], "backends": None})
    assert s.name == "s" and s.ranks == [1, 2] and s.gen_tokens == [16] and s.backends == ["mpi"]
    assert len(list(s.clusters())) == 2 and len(s.loads()) == 2 and s.size() == 2 * 2 * 2


@pytest.mark.parametrize("text,needle", [
    ("ranks: [0]\n", "ranks: expected whole numbers of at least 1"),
    ("backends: [tcp]\n", "backends: unknown backend 'tcp'"),
    ("blas: [bundled, fast]\n", "blas: unknown BLAS 'fast'; expected auto, openblas, bundled or an absolute path"),
    ("concurency: [1]\n", "concurency: unknown field"),
    ("ranks: [1\nmodels: x\n", ":2: not valid YAML"),
    ("- 1\n", "expected a mapping"),
])
def test_sweep_errors_name_file_and_field(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_sweep(f, {})
    assert str(f) in str(e.value) and needle in str(e.value)


def test_bad_flag_is_one_line_exit_2():
    r = run("bench", "--ranks", "1,x", timeout=60)
    assert r.returncode == 2 and "--ranks '1,x'" in r.stderr and "Traceback" not in r.stderr
    r = run("bench", "--blas", "bundled,fast", timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "blas: unknown BLAS 'fast'" in r.stderr


def test_blas_is_part_of_a_point_and_old_points_keep_their_keys():
    old = {"model": "m", "ranks": 2, "hosts": ["local"] * 2, "backend": "mpi", "sharding": "tensor",
           "prompt_tokens": 32, "gen_tokens": 128, "concurrency": 1}
    legacy = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert records.point_key(old) == legacy  # records written before the blas axis keep their points
    keys = {records.point_key({**old, "blas": b}) for b in ("auto", "bundled", "openblas")}
    assert len(keys) == 3 and records.point_key(old) not in keys  # resume keys on blas
    s = load_sweep(None, {"blas": ["bundled", "openblas"], "ranks": [1, 2]})
    assert {cl[4] for cl in s.clusters()} == {"bundled", "openblas"} and len(list(s.clusters())) == 4
    assert load_sweep(None, {}).blas == ["auto"]  # old sweeps: run's default, the anchor alike


# -- measurement pieces ----------------------------------------------------------------------

def test_exact_length_prompts_differ_per_variant(demo_model_path):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(demo_model_path)
    for n in (1, 7, 32, 300):
        texts = [measure.exact_text_prompt(tok, n, v) for v in range(6)]
        assert all(len(tok.encode(t)) == n for t in texts)
        if n >= 7:  # distinct prefixes, so no prompt cache can reuse one
            assert len({tuple(tok.encode(t)[:3]) for t in texts}) > 1


def test_percentiles_match_numpy():
    xs = list(np.random.default_rng(0).exponential(size=101))
    p = measure.percentiles(xs)
    for k, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert p[k] == pytest.approx(np.percentile(xs, q))
    assert p["mean"] == pytest.approx(statistics.fmean(xs))


def test_roofline_counts_the_bytes_decode_reads(demo_model_path):
    cfg = json.loads((demo_model_path / "config.json").read_text())
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    matrices = L * (h * q + 2 * h * kv + q * h + 3 * h * inter) * 4
    norms = L * 2 * h * 4
    head = cfg["vocab_size"] * h * 4 + h * 4  # lm_head (untied here) + final norm
    assert not cfg.get("tie_word_embeddings")
    assert roofline.rank_bytes(demo_model_path, 1, "tensor") == [matrices + norms + head]
    assert roofline.rank_bytes(demo_model_path, 2, "tensor") == [matrices / 2 + norms + head] * 2
    pipe = roofline.rank_bytes(demo_model_path, 2, "pipeline")
    assert sum(pipe) == pytest.approx(matrices + norms + head)
    # 2 ranks on one host: the host reads both shards each step; 8 streams share the weights
    one = roofline.ceiling(demo_model_path, ["a"], "tensor", {"a": 10.0}, prompt_tokens=10, gen_tokens=10,
                           concurrency=1)
    kv_bytes = 2 * L * cfg["num_key_value_heads"] * hd * 15 * 4
    assert one["ceiling_tok_s"] == pytest.approx(10e9 / (matrices + norms + head + kv_bytes))
    two = roofline.ceiling(demo_model_path, ["a", "b"], "tensor", {"a": 10.0, "b": 10.0}, prompt_tokens=10,
                           gen_tokens=10, concurrency=8)
    assert two["ceiling_tok_s"] == pytest.approx(8 * 10e9 / (matrices / 2 + norms + head + 8 * kv_bytes / 2))


# -- real sweeps --------------------------------------------------------------------------------

def _bench_argv(out, *extra):
    return exolaunch_argv("bench", "-m", "demo-llama:tiny", "--prompt-tokens", "16", "--gen-tokens", "8",
                          "--idle-seconds", "0.5", "-o", str(out), *extra)


def _tagged_ranks() -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if ("runtime serve" in cmd or "mlx_lm" in cmd) and "EXOLAUNCH_BENCH_TAG" in p.environ():
                found.append(p.info["pid"])
        except (psutil.Error, OSError):
            continue
    return found


def _no_ranks_left(timeout=15.0) -> None:
    deadline = time.monotonic() + timeout
    while _tagged_ranks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _tagged_ranks(), "bench left rank processes behind"


@pytest.mark.slow
def test_small_sweep_on_one_and_two_ranks_writes_every_output(tmp_path, model_cache):
    out = tmp_path / "out"
    env = env_for_tests(EXOLAUNCH_CACHE=str(model_cache))
    r = subprocess.run(_bench_argv(out, "--ranks", "1,2", "--concurrency", "1,2", "--repeats", "1"),
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("results.jsonl", "summary.csv", "summary.md", "throughput_vs_ranks.png", "latency_vs_throughput.png"):
        assert (out / name).stat().st_size > 0, name
    recs = records.load(out / "results.jsonl")
    assert len(recs) == 4 and all(x["ok"] for x in recs)
    assert {(x["config"]["ranks"], x["config"]["concurrency"]) for x in recs} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for x in recs:
        m, c = x["metrics"], x["config"]
        assert m["tokens_generated"] == c["gen_tokens"] * c["concurrency"]
        assert m["prompt_tokens_seen"] == c["prompt_tokens"]
        assert 0 < m["ttft_s"]["p50"] <= m["e2e_s"]["p50"] < 60
        assert m["decode_tok_s"] > 0 and m["aggregate_tok_s"] > 0 and m["prompt_tok_s"] > 0
        assert len(m["peak_mem_mb"]) == c["ranks"] and all(20 < v < 4000 for v in m["peak_mem_mb"])
        assert len(m["idle_cpu_pct"]) == c["ranks"] and all(0 <= v < 50 for v in m["idle_cpu_pct"])
        assert x["roofline"]["ceiling_tok_s"] > 0 and x["roofline"]["pct_of_ceiling"] > 0
        assert x["env"]["versions"]["mlx"] and x["env"]["git_commit"] and c["hosts"] == ["local"] * c["ranks"]
        # run's default --blas auto: OpenBLAS, read from the ranks' mapped libraries
        assert c["blas"] == "auto" and len(x["blas"]["ranks"]) == c["ranks"]
        assert ("libopenblas" in x["blas"]["library"]) == bool(find_openblas()), x["blas"]
    # launch to first token is on the first run of each cluster only
    assert sum(x["metrics"]["launch_to_first_token_s"] is not None for x in recs) == 2
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4 and {r_["server"] for r_ in rows} == {"exolaunch"}
    assert "| demo-llama:tiny |" in r.stdout  # the markdown table is printed too
    _no_ranks_left()


@pytest.mark.slow
def test_killed_sweep_resumes_where_it_stopped(tmp_path, model_cache):
    out = tmp_path / "out"
    env = env_for_tests(EXOLAUNCH_CACHE=str(model_cache))
    argv = _bench_argv(out, "--ranks", "2", "--concurrency", "1", "--repeats", "6")
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 240
    while len(records.load(out / "results.jsonl")) < 2:
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = records.load(out / "results.jsonl")
    assert 2 <= len(before) < 6
    _no_ranks_left()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    after = records.load(out / "results.jsonl")
    assert sorted(x["repeat"] for x in after) == list(range(6))  # each repeat exactly once
    assert after[:len(before)] == before
    assert f"{6 - len(before)} run(s) to do" in r.stderr
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert again.returncode == 0 and "already in" in again.stderr
    assert len(records.load(out / "results.jsonl")) == 6


def test_shipped_sweeps_are_valid():
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        assert load_sweep(f, {}).size() > 0, f


@pytest.mark.slow
def test_against_mlx_lm_puts_both_servers_and_ratios_in_the_table(tmp_path, model_cache):
    out = tmp_path / "out"
    env = env_for_tests(EXOLAUNCH_CACHE=str(model_cache))
    r = subprocess.run(_bench_argv(out, "--ranks", "2", "--backend", "mpi", "--concurrency", "2", "--repeats", "1",
                                   "--against", "mlx-lm", "--blas", "bundled"),
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = records.load(out / "results.jsonl")
    assert sorted(x["server"] for x in recs) == ["exolaunch", "mlx-lm"] and all(x["ok"] for x in recs)
    assert recs[0]["point"] == recs[1]["point"]
    for x in recs:  # the same exact-length prompts and full-length generations on both
        assert x["metrics"]["prompt_tokens_seen"] == 16 and x["metrics"]["tokens_generated"] == 16
        assert len(x["metrics"]["idle_cpu_pct"]) == 2 and x["metrics"]["launch_to_first_token_s"] > 0
        # --blas bundled on both servers: mlx's own BLAS on every rank, no OpenBLAS
        assert x["config"]["blas"] == "bundled" and "mlx" in x["blas"]["library"], x["blas"]
        assert len(x["blas"]["ranks"]) == 2 and "openblas" not in x["blas"]["library"]
    rows = {row["server"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    ours, anchor = rows["exolaunch"], rows["mlx-lm"]
    assert float(ours["aggregate_ratio"]) == pytest.approx(
        float(ours["aggregate_tok_s"]) / float(anchor["aggregate_tok_s"]), rel=1e-3)
    assert "mlx-lm (anchor)" in r.stdout and "| bundled: libblas" in r.stdout
    _no_ranks_left()
