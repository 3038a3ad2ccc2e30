"""`exolaunch pull` / launcher.weights: staging over a real loopback sshd, resumes, disk checks,
pipeline file selection, and the hub path's offline error.

Every "host" is this machine, so each gets its own destination directory (the hostfile's per-host
`env: {EXOLAUNCH_MODELS: ...}`, or --dest) to make the copies observable."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import weights
from launcher.hostfile import load_hostfile
from tests.launch_helpers import ROOT, env_for_tests, exolaunch_argv, run


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha(p) for p in sorted(d.rglob("*")) if p.is_file()}


def hostfile(path: Path, cluster, roots: dict[str, Path | None], slots: int = 1, env: str = "") -> Path:
    """A YAML hostfile: alias -> EXOLAUNCH_MODELS root on that host (None: no per-host root)."""
    by = {h.alias: h for h in cluster.hosts}
    lines = [f"ssh_config: {cluster.ssh_config}"]
    if env:
        lines.append(f"env: {env}")
    lines.append("hosts:")
    for alias, root in roots.items():
        e = f", env: {{EXOLAUNCH_MODELS: '{root}'}}" if root else ""
        lines.append(f"  - {{ssh: {alias}, ips: [{by[alias].ip}], slots: {slots}, python: {sys.executable}{e}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from runtime.demo_models import ensure

    return ensure("demo-llama", cache_dir=tmp_path_factory.mktemp("src"), size="tiny")


@pytest.fixture
def big_model(tmp_path, tiny_model) -> Path:
    """The tiny model plus a 48 MB file, so a copy takes long enough to interrupt."""
    d = tmp_path / "big-model"
    shutil.copytree(tiny_model, d)
    (d / "zz-extra.safetensors").write_bytes(random.Random(7).randbytes(48 << 20))
    return d


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    # hash caches (ours and the "remote" probes') in a throwaway place
    monkeypatch.setenv("EXOLAUNCH_CACHE", str(tmp_path / "cache"))


def pull(hf: Path, model: str, *args: str, timeout: float = 180):
    r = run("--hostfile", str(hf), "pull", model, "--json", *args, timeout=timeout,
            env=env_for_tests(EXOLAUNCH_CACHE=os.environ["EXOLAUNCH_CACHE"]))
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    return r, report


def by_host(report: dict) -> dict[str, dict]:
    return {h["name"]: h for h in report["hosts"]}


# ----------------------------------------------------------------------------- staging over ssh


@pytest.mark.parametrize("method", ["rsync", "stream"])
def test_stage_copies_identical_files_then_skips_everything(ssh_cluster, tmp_path, tiny_model, method):
    roots = {"h1": tmp_path / "h1", "h2": tmp_path / "h2"}
    hf = hostfile(tmp_path / "hosts.yaml", ssh_cluster, roots)
    r, rep = pull(hf, str(tiny_model), "--method", method)
    assert r.returncode == 0, r.stderr
    want = tree(tiny_model)
    for alias, root in roots.items():
        d = root / tiny_model.name
        assert tree(d) == want, alias
        h = by_host(rep)[alias]
        assert h["method"] == method and h["error"] is None
        assert sorted(h["copied"]) == sorted(want) and h["skipped"] == []
        assert h["dest"] == str(d)
    # the marker that says "complete" is copied last
    assert ".exolaunch-complete" in want
    assert by_host(rep)["h1"]["copied"][-1] == ".exolaunch-complete"
    assert "h1" in r.stderr and "h2" in r.stderr  # per-host lines and the summary table

    r2, rep2 = pull(hf, str(tiny_model), "--method", method)
    assert r2.returncode == 0, r2.stderr
    for alias in roots:
        h = by_host(rep2)[alias]
        assert h["copied"] == [] and sorted(h["skipped"]) == sorted(want), h
        assert h["wire_bytes"] == 0 and h["method"] == "none needed"
    table = r2.stderr
    assert "skipped" in table and "none needed" in table


def test_stage_api_with_dest_and_changed_file_is_recopied(ssh_cluster, tmp_path, tiny_model):
    hf = load_hostfile(hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": None}))
    dest = tmp_path / "exact"
    rep = weights.stage(tiny_model, hf, dest=str(dest))
    assert rep.ok, rep.render()
    assert tree(dest) == tree(tiny_model)
    # same size, different bytes: caught by the hash, re-sent whole
    victim = dest / "tokenizer.json"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    rep = weights.stage(tiny_model, hf, dest=str(dest))
    assert rep.ok, rep.render()
    assert rep.host("h1").copied == ["tokenizer.json"]
    assert tree(dest) == tree(tiny_model)


def test_local_host_stage_to_other_dir_and_in_place(tmp_path, tiny_model):
    """The built-in hostfile (this machine, no SSH): in place by default, copied with --dest."""
    hf = load_hostfile(None)
    rep = weights.stage(tiny_model, hf)
    assert rep.ok and rep.host("local").method == "in place" and rep.host("local").copied == []
    rep = weights.stage(tiny_model, hf, dest=str(tmp_path / "copy"), method="stream")
    assert rep.ok, rep.render()
    assert tree(tmp_path / "copy") == tree(tiny_model)


def test_default_destination_is_the_same_path_in_place(ssh_cluster, tmp_path, tiny_model):
    """No --dest, no EXOLAUNCH_MODELS: the same absolute path; this 'host' sees the source there,
    so the hash check finds it identical and nothing is copied (a shared path is used in place)."""
    hf = load_hostfile(hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": None}))
    rep = weights.stage(tiny_model, hf)
    h = rep.host("h1")
    assert rep.ok and h.copied == [] and h.dest == str(tiny_model.resolve())
    assert sorted(h.skipped) == sorted(tree(tiny_model))


@pytest.mark.parametrize("method", ["rsync", "stream"])
def test_truncated_partial_file_is_resumed_not_restarted(ssh_cluster, tmp_path, big_model, method):
    root = tmp_path / "h1"
    hf = hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": root})
    d = root / big_model.name
    d.mkdir(parents=True)
    big = big_model / "zz-extra.safetensors"
    size = big.stat().st_size
    have = 40 << 20
    with open(big, "rb") as f:
        (d / big.name).write_bytes(f.read(have))
    r, rep = pull(hf, str(big_model), "--method", method)
    assert r.returncode == 0, r.stderr
    h = by_host(rep)["h1"]
    assert h["resumed"] == [big.name]
    others = sum(p.stat().st_size for p in big_model.iterdir() if p.name != big.name)
    # only the missing 8 MB of the big file (plus the small files and protocol overhead) went over
    assert h["wire_bytes"] < (size - have) + others + (1 << 20), h
    assert h["bytes"] == (size - have) + others
    assert tree(d) == tree(big_model)


def test_interrupted_stage_resumes(ssh_cluster, tmp_path, big_model):
    """Kill a (bandwidth-limited) pull once the big file has started to land; the rerun sends
    only what is missing and the result is byte-identical."""
    root = tmp_path / "h1"
    hf = hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": root})
    target = root / big_model.name / "zz-extra.safetensors"
    env = env_for_tests(EXOLAUNCH_CACHE=os.environ["EXOLAUNCH_CACHE"])
    proc = subprocess.Popen(exolaunch_argv("--hostfile", str(hf), "pull", str(big_model), "--bwlimit", "4000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if target.exists() and target.stat().st_size > (4 << 20):
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        else:
            raise AssertionError("the big file never started to land")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    time.sleep(0.5)  # the receiving side notices the dropped connection
    partial = target.stat().st_size
    full = (big_model / "zz-extra.safetensors").stat().st_size
    assert 0 < partial < full, (partial, full)
    r, rep = pull(hf, str(big_model))
    assert r.returncode == 0, r.stderr
    h = by_host(rep)["h1"]
    assert "zz-extra.safetensors" in h["resumed"], h
    assert h["wire_bytes"] < full - partial + (2 << 20), (h, partial)
    assert tree(root / big_model.name) == tree(big_model)


# ----------------------------------------------------------------------------- disk space


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_not_enough_disk_refuses_that_host_with_numbers(ssh_cluster, tmp_path, big_model, tiny_tmpfs):
    hf = hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": tmp_path / "h1", "h2": tiny_tmpfs})
    r, rep = pull(hf, str(big_model))
    assert r.returncode == 1, r.stderr
    h1, h2 = by_host(rep)["h1"], by_host(rep)["h2"]
    assert h1["error"] is None and tree(tmp_path / "h1" / big_model.name) == tree(big_model)
    need = sum(p.stat().st_size for p in big_model.iterdir())
    assert "not enough disk space" in h2["error"] and str(need) in h2["error"], h2["error"]
    assert str(tiny_tmpfs) in h2["error"]
    assert not any(tiny_tmpfs.iterdir()), "nothing may be written to a host that was refused"
    assert "pull failed on 1 host(s): h2" in r.stderr
    assert "h2: not enough disk space" in r.stderr


def test_unreachable_host_is_named(ssh_cluster, tmp_path, tiny_model):
    p = hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": tmp_path / "h1"})
    p.write_text(p.read_text() + f"  - {{name: ghost, ssh: 127.0.0.9, port: {ssh_cluster.port}, "
                                 f"python: {sys.executable}, env: {{EXOLAUNCH_MODELS: '{tmp_path / 'g'}'}}}}\n")
    r, rep = pull(p, str(tiny_model), "--connect-timeout", "3")
    assert r.returncode == 1
    assert by_host(rep)["h1"]["error"] is None
    assert "cannot reach 127.0.0.9 over SSH" in by_host(rep)["ghost"]["error"]
    assert "pull failed on 1 host(s): ghost" in r.stderr


# ----------------------------------------------------------------------------- pipeline selection


class _Group:
    def __init__(self, rank, size):
        self._r, self._s = rank, size

    def rank(self):
        return self._r

    def size(self):
        return self._s


def test_pipeline_selection_demo_kimi_two_ranks(tmp_path):
    from runtime.demo_models import ensure

    d = ensure("demo-kimi", cache_dir=tmp_path, size="tiny", n_shards=4)
    from launcher.hostfile import Host, Hostfile

    hf = Hostfile(path="t", hosts=[Host(name="a", ssh="a"), Host(name="b", ssh="b")])
    sel = weights.files_for_ranks(d, hf, "pipeline")
    shared = {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", ".exolaunch-complete"}
    shard = "model-0000{}-of-00004.safetensors".format
    # rank 0 (host a) holds the last layers (2, 3) + embeddings; rank 1 the first (0, 1) + norm/head
    assert sel["a"] == shared | {shard(1), shard(3), shard(4)}
    assert sel["b"] == shared | {shard(1), shard(2), shard(4)}
    assert weights.files_for_ranks(d, hf, "tensor") == {"a": None, "b": None}

    # the same split as mlx-lm's own pipeline(): load lazily, split with a fake group
    from mlx_lm.utils import load_model

    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    for rank, host in ((0, "a"), (1, "b")):
        model, _ = load_model(d, lazy=True, strict=False)
        model.model.pipeline(_Group(rank, 2))
        assert weights.layer_range(4, rank, 2) == (model.model.start_idx, model.model.end_idx)
        import re

        files = {f for k, f in wm.items()
                 if not (m := re.search(r"(?:^|\.)layers\.(\d+)\.", k))
                 or model.model.start_idx <= int(m.group(1)) < model.model.end_idx}
        assert {f for f in sel[host] if f.endswith(".safetensors")} == files


def test_layer_range_matches_mixin_uneven():
    # 7 layers over 3 ranks: splits [3, 2, 2]; rank 2 first
    assert [weights.layer_range(7, r, 3) for r in range(3)] == [(4, 7), (2, 4), (0, 2)]


def test_stage_pipeline_copies_only_each_hosts_files(ssh_cluster, tmp_path):
    from runtime.demo_models import ensure

    d = ensure("demo-kimi", cache_dir=tmp_path / "src", size="tiny", n_shards=4)
    roots = {"h1": tmp_path / "h1", "h2": tmp_path / "h2"}
    hf = hostfile(tmp_path / "hosts.yaml", ssh_cluster, roots)
    r, rep = pull(hf, str(d), "--sharding", "pipeline")
    assert r.returncode == 0, r.stderr
    got1 = {p.name for p in (roots["h1"] / d.name).iterdir()}
    got2 = {p.name for p in (roots["h2"] / d.name).iterdir()}
    assert "model-00002-of-00004.safetensors" not in got1 and "model-00003-of-00004.safetensors" in got1
    assert "model-00003-of-00004.safetensors" not in got2 and "model-00002-of-00004.safetensors" in got2
    for got, root in ((got1, roots["h1"]), (got2, roots["h2"])):
        for name in got:
            assert sha(root / d.name / name) == sha(d / name)


# ----------------------------------------------------------------------------- hub path


def test_hub_offline_gives_clear_error(ssh_cluster, tmp_path):
    hf = hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": None, "h2": None},
                  env=f"{{HF_HUB_OFFLINE: '1', HF_HOME: '{tmp_path / 'hf'}'}}")
    r, rep = pull(hf, "mlx-community/no-such-model-for-tests", timeout=120)
    assert r.returncode == 1, r.stderr
    for alias in ("h1", "h2"):
        err = by_host(rep)[alias]["error"]
        assert err.startswith(f"host {alias} cannot reach the Hugging Face Hub: "), err
        assert err.endswith("Fix: use --stage."), err
    assert "pull failed on 2 host(s): h1, h2" in r.stderr


def test_hub_error_messages():
    assert "Fix: use --stage" in weights.hub_error("m1", "o/r", {"type": "ConnectionError", "msg": "boom"})
    assert "HF_TOKEN" in weights.hub_error("m1", "o/r", {"type": "GatedRepoError", "msg": "401"})
    assert "pip install huggingface-hub" in weights.hub_error("m1", "o/r", {"type": "ModuleNotFoundError",
                                                                          "msg": "x", "step": "import"})


def test_bad_flags_exit_2(tmp_path, tiny_model):
    r = run("pull", str(tiny_model), "--dest", "relative/path")
    assert r.returncode == 2 and "--dest" in r.stderr
    r = run("pull", str(tiny_model), "--method", "ftp")
    assert r.returncode == 2 and "--method" in r.stderr
    r = run("pull", "not a model")
    assert r.returncode == 2 and "no such directory" in r.stderr


def test_rsync_argv_quotes_and_secludes(tmp_path):
    from launcher import ssh
    from launcher.hostfile import Host

    h = Host(name="m", ssh="user@m1.local", port=2222)
    argv = weights.rsync_argv(h, tmp_path, "/models/a b", ssh.SshOptions(config="/x y/cfg"), resume=True)
    assert argv[:2] == ["rsync", "-s"] and "--append-verify" in argv and "--inplace" in argv
    assert argv[-3:] == ["--", f"{tmp_path}/", "user@m1.local:/models/a b/"]
    e = argv[argv.index("-e") + 1]
    assert "'/x y/cfg'" in e and "-p 2222" in e
