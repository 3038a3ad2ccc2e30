"""Planner and catalogue: decisions on catalogue models against the example hostfiles (fast, pure)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.catalogue import card_from_dir, count_params, load_catalogue, resolve_card
from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile, builtin_local, load_hostfile
from launcher.planner import plan_for, split_layers
from launcher.topology import Link, Topology, load_topology

ROOT = Path(__file__).resolve().parent.parent


def tb5(n: int | None = None):
    hf = load_hostfile(ROOT / "hostfiles/tb5.yaml")
    topo = load_topology(ROOT / "configs/topology-tb5.yaml")
    if n is not None:
        hf = hf.subset([h.name for h in hf.hosts[:n]])
    return hf, topo


def ethernet():
    return load_hostfile(ROOT / "hostfiles/ethernet.yaml"), load_topology(ROOT / "configs/topology-ethernet.yaml")


def islands(backend=None):
    hosts = [Host(name=n, ssh=f"{n}.local", ips=(f"10.0.0.{i + 1}",), memory_gb=192)
             for i, n in enumerate(("a1", "a2", "b1", "b2"))]
    hf = Hostfile(path="islands.yaml", hosts=hosts, backend=backend)
    links = [Link("a1", "a2", "tb5", {"a1": "rdma_en2", "a2": "rdma_en2"}),
             Link("b1", "b2", "tb5", {"b1": "rdma_en2", "b2": "rdma_en2"})]
    links += [Link(a, b, "ethernet") for a in ("a1", "a2") for b in ("b1", "b2")]
    return hf, Topology(links=links)


# ----------------------------------------------------------------------------- catalogue


def test_catalogue_has_the_issue_models_with_sources():
    cat = load_catalogue()
    for name in ("kimi-k2", "kimi-k2-thinking", "deepseek-v3.1", "deepseek-v3.1-4bit", "deepseek-v3.1-8bit",
                 "qwen3-235b-a22b", "qwen3-30b-a3b", "llama-3.3-70b", "llama-3.1-8b", "gpt-oss-120b", "glm-4.7",
                 "demo-llama", "demo-qwen3", "demo-kimi"):
        assert name in cat, name
        c = cat[name]
        assert c.source and c.layers > 0 and c.hidden_size > 0 and c.disk_bytes > 0
        assert c.params_active <= c.params_total
        if not name.startswith("demo-"):
            assert c.repo.startswith("mlx-community/")


def test_catalogue_counts_agree_with_the_published_totals():
    # the shapes in the catalogue, counted, give the published parameter totals (within 2%)
    for name in ("kimi-k2", "deepseek-v3.1", "qwen3-235b-a22b", "qwen3-30b-a3b", "llama-3.3-70b", "llama-3.1-8b",
                 "glm-4.7"):
        c = load_catalogue()[name]
        cfg = {"hidden_size": c.hidden_size, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
               "num_key_value_heads": c.kv_heads, "vocab_size": c.vocab_size, "head_dim": c.head_dim,
               "intermediate_size": c.intermediate_size, "n_routed_experts": c.experts,
               "num_experts_per_tok": c.experts_per_token, "moe_intermediate_size": c.moe_intermediate_size,
               "n_shared_experts": c.shared_experts, "first_k_dense_replace": c.first_dense_layers}
        if c.kv_lora_rank:
            cfg.update(kv_lora_rank=c.kv_lora_rank, q_lora_rank=1536, qk_nope_head_dim=128,
                       qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=128)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        total, _ = count_params(cfg)
        assert abs(total / c.params_total - 1) < 0.02, (name, total, c.params_total)


def test_resolve_by_repo_id_and_unknown_names():
    assert resolve_card("mlx-community/Kimi-K2-Instruct-4bit").name == "kimi-k2"
    with pytest.raises(ConfigError, match="did you mean 'kimi-k2'"):
        resolve_card("kimi-k3")
    with pytest.raises(ConfigError, match="exolaunch pull"):
        resolve_card("nobody/not-a-cached-repo-xyz")


def test_card_derived_from_a_demo_model_directory_matches_its_config(tmp_path):
    from runtime import demo_models

    path = demo_models.ensure("demo-kimi", cache_dir=tmp_path, size="tiny")
    cfg = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    card = card_from_dir(path)
    assert card.architecture == cfg["model_type"] == "kimi_k2"
    assert (card.layers, card.hidden_size, card.heads, card.kv_heads) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert card.experts == cfg["n_routed_experts"] and card.experts_per_token == cfg["num_experts_per_tok"]
    assert card.kv_lora_rank == cfg["kv_lora_rank"]
    assert card.params_total == index["metadata"]["total_parameters"]
    assert card.disk_bytes == index["metadata"]["total_size"]
    assert card.params_active < card.params_total  # MoE
    assert card.context_length == cfg["max_position_embeddings"]
    # our own count of the shapes agrees with what the generator wrote (norms aside)
    total, _ = count_params(cfg)
    assert abs(total / index["metadata"]["total_parameters"] - 1) < 0.02
    assert set(card.sharding) == {"tensor", "pipeline"}
    # and the directory plans like any other model
    plan = plan_for(str(path), builtin_local(2), None)
    assert plan.fits and plan.sharding == "tensor"


# ----------------------------------------------------------------------------- fits / does not fit


def test_kimi_k2_does_not_fit_one_512gb_mac_but_fits_four():
    one = plan_for("kimi-k2", *tb5(1))
    assert not one.fits and not one.memory_fits
    assert one.ranks[0].free_gb < 0
    assert "does not fit" in one.render()
    four = plan_for("kimi-k2", *tb5())
    assert four.fits
    assert all(r.weights_gb < 160 for r in four.ranks)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_llama_8b_fits_anywhere(n):
    assert plan_for("llama-3.1-8b", *tb5(n)).fits
    assert plan_for("llama-3.1-8b", builtin_local(1), None).fits
    assert plan_for("llama-3.1-8b", builtin_local(2), None).fits


def test_llama_8b_on_three_ethernet_hosts_runs_uneven_tensor_parallel():
    # 8 KV heads over 3 ranks: no pipeline in mlx-lm's llama, so the uneven split (3+3+2 KV
    # heads, MLP columns in whole 4-bit groups) is what runs; rank 2 holds less
    plan = plan_for("llama-3.1-8b", *ethernet())
    assert plan.fits and plan.sharding == "tensor"
    text = " ".join(plan.reasons)
    assert "uneven: heads 12+12+8, KV heads 3+3+2" in text and "no pipeline" in text
    assert plan.ranks[0].weights_gb > plan.ranks[2].weights_gb
    assert "tensor split, uneven" in plan.render()


def test_unknown_remote_memory_is_assumed_to_fit_with_a_warning():
    hf = Hostfile(hosts=[Host(name="far", ssh="far.lan", ips=("10.1.1.1",))])
    plan = plan_for("kimi-k2", hf, None)
    assert plan.fits and plan.ranks[0].usable_gb is None
    assert any("memory unknown" in w for w in plan.warnings)
    assert "unknown" in plan.render()


def test_local_host_without_memory_uses_this_machines_ram():
    import psutil

    plan = plan_for("demo-llama", builtin_local(2), None)
    ram = psutil.virtual_memory().total / 2**30
    assert plan.hosts["local"].ram_gb == pytest.approx(ram)
    assert plan.ranks[0].usable_gb is not None


def test_reserve_gb_raises_usable_memory():
    default = plan_for("deepseek-v3.1", *tb5(2))
    raised = plan_for("deepseek-v3.1", *tb5(2), reserve_gb=16)
    assert raised.ranks[0].usable_gb == pytest.approx(512 - 16)
    assert raised.ranks[0].free_gb > default.ranks[0].free_gb


def test_kv_cache_grows_with_context_and_batch():
    small = plan_for("llama-3.3-70b", *tb5(2), context=4096)
    big = plan_for("llama-3.3-70b", *tb5(2), context=65536, batch=4)
    assert big.ranks[0].kv_gb == pytest.approx(small.ranks[0].kv_gb * 64)
    # GQA KV heads split across TP; MLA's latent cache is replicated
    assert plan_for("llama-3.3-70b", *tb5(4), context=4096).ranks[0].kv_gb == pytest.approx(small.ranks[0].kv_gb / 2)
    k2, k4 = plan_for("kimi-k2", *tb5(2), context=4096), plan_for("kimi-k2", *tb5(4), context=4096)
    assert k2.ranks[0].kv_gb == pytest.approx(k4.ranks[0].kv_gb)


# ----------------------------------------------------------------------------- layout and backend


def test_tb5_full_mesh_chooses_tensor_parallel_and_jaccl():
    hf, topo = tb5()
    hf = dataclasses.replace(hf, backend=None)  # let the planner pick the backend from the topology
    plan = plan_for("qwen3-235b-a22b", hf, topo)
    assert plan.sharding == "tensor" and plan.backend == "jaccl" and plan.tensor_size == 4
    assert "RDMA" in plan.backend_reason
    assert plan.fits


def test_ethernet_mixed_memory_chooses_an_uneven_pipeline_proportional_to_memory():
    plan = plan_for("qwen3-235b-a22b-4bit", *ethernet())
    assert plan.sharding == "pipeline" and plan.backend == "ring"
    assert plan.fits
    split = plan.split
    assert sum(split) == 94 and split[0] > split[1] > split[2]
    # usable 144 / 96 / 48 GB -> layers in proportion 3:2:1
    assert split == split_layers(94, [144, 96, 48])
    assert [r.shard for r in plan.ranks][0] == "layers 0-46"
    even = next(a for a in plan.alternatives if a.name == "pipeline")
    assert not even.memory_fits  # the even split overflows the 64 GB mini


def test_two_tb_islands_hybrid_only_with_a_backend_that_can_split():
    ring = plan_for("qwen3-235b-a22b", *islands())
    assert ring.backend == "ring" and ring.sharding == "pipeline"
    assert any("ring does not support split" in r for r in ring.reasons)
    mpi = plan_for("qwen3-235b-a22b", *islands(), backend="mpi")
    assert mpi.sharding == "hybrid" and mpi.tensor_size == 2 and mpi.split == [47, 47]
    assert mpi.fits


def test_divisibility_rules_out_tp_and_names_the_numbers():
    # glm-4.7: 96 heads but 8 KV heads; 3 ranks split them unevenly (3+3+2), 9 cannot at all
    hf3, topo3 = tb5(3)
    plan3 = plan_for("glm-4.7", hf3, topo3)
    assert plan3.sharding == "tensor" and any("tensor split, uneven" in r for r in plan3.reasons)
    card = dataclasses.replace(resolve_card("glm-4.7"), kv_heads=2)
    plan = plan_for(card, *ethernet())
    assert plan.sharding == "pipeline"
    assert any("num_key_value_heads=2" in r and "3 ranks" in r for r in plan.reasons)
    tensor = next(a for a in plan.alternatives if a.sharding == "tensor")
    assert tensor.problems


def test_requested_sharding_and_backend_are_respected():
    plan = plan_for("qwen3-235b-a22b", *tb5(), sharding="pipeline", backend="mpi")
    assert plan.sharding == "pipeline" and plan.backend == "mpi"
    with pytest.raises(ConfigError):
        plan_for("qwen3-235b-a22b", *tb5(), sharding="diagonal")


def test_np_plans_the_first_slots_only():
    plan = plan_for("deepseek-v3.1", *tb5(), np=2)
    assert len(plan.ranks) == 2 and plan.fits


def test_split_layers():
    assert split_layers(61, [1, 1, 1, 1]) == [16, 15, 15, 15]
    assert split_layers(10, [100, 1]) == [9, 1]
    assert sum(split_layers(94, [144, 96, 48])) == 94
    assert split_layers(2, [1, 1, 1, 1]) == [1, 1, 0, 0]  # fewer layers than stages: refused by the plan


def test_more_ranks_than_layers_is_refused_with_the_numbers():
    # demo-kimi:tiny has 4 layers and 8 heads: 8 ranks run tensor parallel, not as 8 stages
    hosts = [Host(name=f"m{i}", ssh=f"m{i}.local", ips=(f"10.0.0.{i + 1}",), memory_gb=64) for i in range(8)]
    hf = Hostfile(path="eight.yaml", hosts=hosts)
    topo = Topology(links=[Link(a.name, b.name, "tb5") for i, a in enumerate(hosts) for b in hosts[i + 1:]])
    plan = plan_for("demo-kimi:tiny", hf, topo)
    assert plan.fits and plan.sharding == "tensor"
    pipe = next(a for a in plan.alternatives if a.sharding == "pipeline")
    assert any("4 layers cannot be split into 8 pipeline stages" in p for p in pipe.problems)
    assert not plan_for("demo-kimi:tiny", hf, topo, sharding="pipeline").fits


# ----------------------------------------------------------------------------- estimates


def _with_bandwidth(bw):
    hf, topo = tb5()
    return plan_for("qwen3-235b-a22b", hf, topo, bandwidth={h.name: bw for h in hf.hosts})


def test_more_memory_bandwidth_is_faster():
    assert _with_bandwidth(800).tok_s > _with_bandwidth(400).tok_s > _with_bandwidth(200).tok_s


def test_slower_links_make_tensor_parallel_slower():
    hf, topo = tb5()
    fast = plan_for("qwen3-235b-a22b", hf, topo, sharding="tensor")
    slow_topo = Topology(links=[dataclasses.replace(ln, latency_us=50.0, bandwidth_gbps=10.0) for ln in topo.links])
    slow = plan_for("qwen3-235b-a22b", hf, slow_topo, sharding="tensor")
    assert slow.tok_s < fast.tok_s and slow.layout.comm_ms > fast.layout.comm_ms


def test_tensor_parallel_beats_one_host_and_pipeline_does_not_at_batch_1():
    one = plan_for("qwen3-235b-a22b", *tb5(1))
    tp = plan_for("qwen3-235b-a22b", *tb5(4))
    pp = plan_for("qwen3-235b-a22b", *tb5(4), sharding="pipeline")
    assert tp.tok_s > 2 * one.tok_s
    assert pp.tok_s <= one.tok_s


def test_moe_reads_fewer_bytes_than_dense_of_the_same_size():
    # a bigger batch touches more experts: throughput grows sublinearly for MoE, ~linearly for dense
    b1 = plan_for("qwen3-30b-a3b", *tb5(1), batch=1)
    b8 = plan_for("qwen3-30b-a3b", *tb5(1), batch=8)
    assert b1.tok_s < b8.tok_s < 8 * b1.tok_s


# ----------------------------------------------------------------------------- CLI


def _cli(*args, check=True):
    env = {**os.environ, "COLUMNS": "160"}
    env.pop("EXOLAUNCH_HOSTFILE", None)
    env.pop("EXOLAUNCH_TOPOLOGY", None)
    p = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=120)
    return p


def test_cli_models_lists_the_catalogue_with_sizes():
    p = _cli("models")
    assert p.returncode == 0, p.stderr
    for s in ("kimi-k2", "mlx-community/Kimi-K2-Instruct-4bit", "578.0", "glm-4.7", "demo-llama", "tensor+pipeline"):
        assert s in p.stdout, s


def test_cli_plan_kimi_on_tb5():
    p = _cli("--hostfile", "hostfiles/tb5.yaml", "plan", "kimi-k2")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for s in ("Layout: tensor", "backend: jaccl", "m3u-4", "TP 4/4", "weights GB", "KV GB", "free GB", "pipeline",
              "tok/s", "Verdict: fits"):
        assert s in out, s


def test_cli_plan_that_does_not_fit_exits_1():
    p = _cli("--hostfile", "hostfiles/ethernet.yaml", "--topology", "configs/topology-ethernet.yaml",
             "plan", "kimi-k2")
    assert p.returncode == 1
    assert "DOES NOT FIT" in p.stdout and "iogpu.wired_limit_mb" in p.stdout


def test_cli_run_with_more_ranks_than_layers_is_refused_not_a_bug():
    p = _cli("run", "demo-kimi:tiny", "-n", "8", "--sharding", "pipeline", "--skip-doctor")
    assert p.returncode == 5, p.stderr
    assert "cannot be split into 8 pipeline stages" in p.stderr and "internal error" not in p.stderr


def test_cli_plan_unknown_model_is_a_config_error():
    p = _cli("plan", "no-such-model")
    assert p.returncode == 2 and "no such catalogue name" in p.stderr


def test_a_draft_model_is_counted_on_rank_0_only():
    # --draft: rank 0 holds the draft whole (runtime/draft.py), the other ranks nothing of it
    from launcher.catalogue import GB, resolve_card

    base = plan_for("kimi-k2", *tb5())
    with_draft = plan_for("kimi-k2", *tb5(), draft="llama-3.1-8b")
    d = resolve_card("llama-3.1-8b")
    extra = (d.disk_bytes + d.kv_bytes_per_token(1, base.context) * base.context) / GB
    before = {p.rank: p.weights_gb for p in base.layout.ranks}
    after = {p.rank: p.weights_gb for p in with_draft.layout.ranks}
    assert after[0] == pytest.approx(before[0] + extra)
    assert all(after[r] == before[r] for r in before if r != 0)
    unknown = plan_for("kimi-k2", *tb5(), draft="nobody/not-cached-anywhere")
    assert any("--draft nobody/not-cached-anywhere" in w for w in unknown.warnings)


def test_more_ranks_than_cores_on_this_machine_choose_mpi():
    # both backends poll while a collective waits; OpenMPI's ranks can be told to yield
    # (launcher/oversubscription.py), ring's cannot
    import shutil

    cores = os.cpu_count() or 1
    assert plan_for("demo-llama:tiny", builtin_local(cores), None).backend == "ring"
    over = plan_for("demo-llama:tiny", builtin_local(cores + 1), None)
    assert over.backend == ("mpi" if shutil.which("mpirun") else "ring")
    assert plan_for("demo-llama:tiny", builtin_local(cores + 1), None, backend="ring").backend == "ring"
