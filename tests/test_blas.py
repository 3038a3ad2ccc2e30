"""An optimized BLAS for CPU ranks (launcher/blas.py, issue 15): each host's agent preloads
OpenBLAS into its ranks when the host has it, shares the host's cores among them, and greedy
tensor-parallel output on OpenBLAS equals one rank's on OpenBLAS."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from launcher import blas
from launcher.ports import free_data_port
from runtime import demo_models as dm
from tests.launch_helpers import run
from tests.test_doctor import _judge, _res

OPENBLAS = blas.find_openblas()
needs_openblas = pytest.mark.skipif(sys.platform != "linux" or OPENBLAS is None,
                                    reason=f"no OpenBLAS on this host ({blas.INSTALL_HINT})")

# what a rank sees: its BLAS threads, whether OpenBLAS is mapped into it, and the matmul's result
PROBE = ("import json, os, mlx.core as mx; "
         "a = mx.arange(12, dtype=mx.float32).reshape(3, 4); "
         "print(json.dumps({'threads': os.environ.get('OPENBLAS_NUM_THREADS'), "
         "'core': os.environ.get('OPENBLAS_CORETYPE'), "
         "'mapped': 'openblas' in open('/proc/self/maps').read(), "
         "'mm': (a @ a.T).tolist()}))")


def _ranks(*args: str) -> list[dict]:
    r = run("exec", *args, "--", "python", "-c", PROBE)
    assert r.returncode == 0, r.stderr
    return [json.loads(m) for m in re.findall(r"(\{.*\})", r.stdout)]


@needs_openblas
def test_ranks_get_openblas_with_the_hosts_cores_shared():
    ranks = _ranks("-n", "2", "--port", str(free_data_port(2)))
    assert len(ranks) == 2
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(r["mapped"] and r["threads"] == share for r in ranks)
    # the kernels this CPU runs, named (None on a CPU without AVX2)
    assert all(r["core"] == blas.core_type(open("/proc/cpuinfo").read()) for r in ranks)
    assert all(r["mm"] == [[14.0, 38.0, 62.0], [38.0, 126.0, 214.0], [62.0, 214.0, 366.0]] for r in ranks)


@needs_openblas
def test_bundled_and_explicit_path():
    (bundled,) = _ranks("-n", "1", "--blas", "bundled")
    # not preloaded, but threads still shared: numpy's OpenBLAS runs the CPU attention
    assert not bundled["mapped"] and bundled["threads"] == str(os.cpu_count() or 1) and bundled["core"] is None
    (path,) = _ranks("-n", "1", "--blas", OPENBLAS, "-x", "OPENBLAS_NUM_THREADS=1")
    assert path["mapped"] and path["threads"] == "1"  # the user's thread count wins


def test_missing_library_fails_the_rank_with_the_fix():
    r = run("exec", "-n", "1", "--blas", "/nonexistent/libopenblas.so.0", "--", "python", "-c", "pass")
    assert r.returncode == 1
    assert "/nonexistent/libopenblas.so.0 does not exist on this host" in r.stderr
    assert "--blas bundled" in r.stderr


def test_bad_mode_is_a_usage_error():
    r = run("exec", "--blas", "fast", "--", "true")
    assert r.returncode == 2
    assert "--blas 'fast'" in r.stderr and r.stderr.count("\n") == 1


def test_rank_env_rules(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    lib = "/lib/x/libopenblas.so.0"
    monkeypatch.setattr(blas, "find_openblas", lambda: lib)
    monkeypatch.setattr(os.path, "exists", lambda p: p == lib)
    env = {"EXOLAUNCH_LOCAL_WORLD_SIZE": "3", "LD_PRELOAD": "/other.so"}
    assert blas.rank_env(env, cpu_count=8, cpuinfo="") == (
        {"LD_PRELOAD": f"{lib}:/other.so", "OPENBLAS_NUM_THREADS": "2"}, None)
    # Kernels named from the CPU's flags, unless the user named them.
    avx512 = "flags\t\t: fpu sse3 avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl\n"
    assert blas.rank_env({}, cpuinfo=avx512)[0]["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert blas.rank_env({}, cpuinfo="flags : sse3 avx avx2 fma\n")[0]["OPENBLAS_CORETYPE"] == "Haswell"
    assert "OPENBLAS_CORETYPE" not in blas.rank_env({}, cpuinfo="flags : sse3 avx\n")[0]
    assert "OPENBLAS_CORETYPE" not in blas.rank_env({"OPENBLAS_CORETYPE": "Zen"}, cpuinfo=avx512)[0]
    assert blas.rank_env({"EXOLAUNCH_LOCAL_WORLD_SIZE": "4"}, cpu_count=2)[0]["OPENBLAS_NUM_THREADS"] == "1"
    # bundled: threads only (numpy's OpenBLAS runs the CPU attention in every mode)
    assert blas.rank_env({"EXOLAUNCH_BLAS": "bundled"}, cpu_count=4) == ({"OPENBLAS_NUM_THREADS": "4"}, None)
    assert blas.rank_env({"EXOLAUNCH_BLAS": "bundled", "OPENBLAS_NUM_THREADS": "3"}) == ({}, None)
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    # auto without OpenBLAS: the bundled BLAS, no error
    assert blas.rank_env({}, cpu_count=2) == ({"OPENBLAS_NUM_THREADS": "2"}, None)
    add, err = blas.rank_env({"EXOLAUNCH_BLAS": "openblas"})
    assert add == {} and "no OpenBLAS found" in err


def test_doctor_tells_a_linux_host_without_openblas_what_to_install():
    ps = _judge([_res("a", info={"blas": {"mode": "auto", "path": None}}),
                 _res("b", info={"blas": {"mode": "auto", "path": "/usr/lib/libopenblas.so.0"}}),
                 _res("c", info={"blas": {"mode": "openblas", "path": None}})])
    a, c = ps
    assert (a.host, a.severity) == ("a", "warning") and "libopenblas0-pthread" in a.fix
    assert (c.host, c.severity) == ("c", "error") and "--blas bundled" in c.fix


@pytest.mark.slow
@needs_openblas
def test_tensor_parallel_greedy_equals_one_rank_on_openblas(tmp_path):
    # SmolLM2's head layout (9 heads / 3 KV heads): the uneven split, in float32, where BLAS matters
    cfg = dm.variant_config("demo-llama", num_hidden_layers=2, architectures=None, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=32, hidden_size=288, intermediate_size=800)
    d = str(dm.write_model(cfg, tmp_path / "llama-9-3"))
    tokens = {}
    for n in (1, 2):
        r = run("exec", "-n", str(n), "--blas", "openblas", "--port", str(free_data_port(n)), "--",
                "python", "-m", "tests.tp_greedy", d, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        for m in re.findall(r"(\{\"model\".*\})", r.stdout):
            line = json.loads(m)
            tokens[(n, line["rank"])] = line["tokens"]
    assert sorted(tokens) == [(1, 0), (2, 0), (2, 1)]
    assert tokens[(2, 0)] == tokens[(2, 1)] == tokens[(1, 0)]
