"""The anchor (mlx_lm.server under mpirun or mlx.launch): real clusters on this machine, plus dry
checks of the commands built for remote hosts."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher import blas
from launcher.bench import anchor
from launcher.bench.anchor import AnchorCluster, anchor_version
from launcher.errors import ConfigError, LaunchError
from launcher.hostfile import Host, Hostfile, builtin_local
from tests.launch_helpers import ROOT, token

TAG_VAR = "EXOLAUNCH_BENCH_TAG"
LOOPBACK_MPI = {"OMPI_MCA_btl": "self,tcp"}  # see tests/launch_helpers.env_for_tests
OPENBLAS = blas.find_openblas()  # scripts/install.sh installs it; without it "openblas" cannot be checked


@pytest.fixture(scope="module")
def llama(model_cache):
    from runtime.demo_models import ensure

    return ensure("demo-llama", size="tiny", cache_dir=model_cache)


def eos_ids(model_dir: Path) -> list[int]:
    e = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    return e if isinstance(e, list) else [e]


def _excluded() -> set[int]:
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def cluster_processes(tag: str, port: int | None = None, extra_pids=()) -> list[str]:
    """Live processes of one anchor cluster: anything with the tag in its environment or command
    line (ranks; mpirun gets it as -x), anything naming the cluster's API port (mpirun,
    mlx.launch, ranks), and the pids given (the guard)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["pid"] in _excluded() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            hit = p.info["pid"] in extra_pids or tag in cmd or (port and f"--port {port}" in cmd)
            if not hit:
                try:
                    hit = f"{TAG_VAR}={tag}" in (f"{k}={v}" for k, v in p.environ().items())
                except (psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            if hit:
                found.append(f"[{p.info['pid']}] {cmd[:200]}")
        except psutil.Error:
            continue
    return found


def wait_gone(tag: str, port: int | None = None, extra_pids=(), timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = cluster_processes(tag, port, extra_pids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def rank_processes(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if anchor.RANK_MARKER in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and \
                    p.environ().get(TAG_VAR) == tag and "mpirun" not in cmd and "mlx.launch" not in cmd:
                out.append(p)
        except psutil.Error:
            continue
    return out


def openblas_mapped(p: psutil.Process) -> list[str]:
    """The OpenBLAS libraries in a process's memory (numpy's libscipy_openblas64_ does not count:
    its symbols are renamed, mlx never calls it)."""
    return sorted({m.path for m in p.memory_maps() if os.path.basename(m.path).startswith("libopenblas")})


def check_blas(ranks: list[psutil.Process], mode: str) -> None:
    """Each rank runs what `run --blas mode` gives ours: OpenBLAS preloaded or not, and in both
    cases the cores shared among the host's ranks (numpy's OpenBLAS runs the CPU attention)."""
    want = mode == "openblas" or (mode == "auto" and OPENBLAS is not None)
    for p in ranks:
        env = p.environ()
        if want:
            assert openblas_mapped(p) and OPENBLAS in env.get("LD_PRELOAD", ""), (p.pid, env.get("LD_PRELOAD"))
        else:
            assert not openblas_mapped(p) and "OPENBLAS_CORETYPE" not in env, p.pid
        assert env["OPENBLAS_NUM_THREADS"] == str(max(1, os.cpu_count() // len(ranks))), p.pid


def stream_completion(base_url: str, body: dict, timeout: float = 120) -> dict:
    """POST /v1/completions with stream: the text chunks, the finish reason and the usage."""
    hostport = base_url.split("//", 1)[1].split("/", 1)[0]
    c = http.client.HTTPConnection(hostport, timeout=timeout)
    try:
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        chunks, finish, usage, done = [], None, None, False
        for raw in r:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                d = json.loads(line[6:])
                usage = d.get("usage") or usage
                for ch in d["choices"]:
                    if ch.get("text"):
                        chunks.append(ch["text"])
                    finish = ch.get("finish_reason") or finish
        return {"chunks": chunks, "finish": finish, "usage": usage, "done": done}
    finally:
        c.close()


# ----------------------------------------------------------------------------- real clusters


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_two_ranks_stream_16_tokens_then_nothing_left(backend, llama, tmp_path):
    tag = token()
    log = tmp_path / "anchor.log"
    lines: list[str] = []
    mode = "openblas" if OPENBLAS else "auto"
    a = AnchorCluster(llama, builtin_local(), np=2, backend=backend, blas=mode,
                      env={TAG_VAR: tag, **LOOPBACK_MPI}, log=log, ready_timeout=120, echo=lines.append)
    assert a.base_url == f"http://127.0.0.1:{a.port}/v1" and a.world_size == 2
    assert a.rank_cmd_marker == "mlx_lm.server" and a.model_name == str(llama.resolve())
    with a:
        assert 0 < a.started_at <= a.http_at <= a.ready_at
        ranks = rank_processes(tag)
        assert len(ranks) == 2, [r.cmdline() for r in ranks]  # both alive: one group, one server
        check_blas(ranks, mode)
        body = {"model": a.model_name, "prompt": "the quick brown fox", "max_tokens": 16, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                "logit_bias": {str(i): -1000 for i in eos_ids(llama)}}
        out = stream_completion(a.base_url, body)
        assert out["done"] and out["finish"] == "length", out
        assert out["usage"]["completion_tokens"] == 16, out
        assert out["usage"]["prompt_tokens"] > 0
        # Text chunks: at most one per token (a token that ends mid-character waits for the next).
        assert 1 <= len(out["chunks"]) <= 16, out
        guard = a.proc.pid
    assert a.proc.poll() is not None
    left = wait_gone(tag, a.port, [guard])
    assert not left, f"processes left behind: {left}"
    assert "Starting httpd" in log.read_text()
    assert any("Starting httpd" in line for line in lines)


@pytest.mark.slow
def test_ready_timeout_is_a_launch_error_and_cleans_up(llama):
    tag = token()
    a = AnchorCluster(llama, builtin_local(), np=2, backend="ring", env={TAG_VAR: tag}, ready_timeout=0.5)
    t = time.monotonic()
    with pytest.raises(LaunchError, match=r"was not ready after 0.5 s"):
        a.start()
    assert time.monotonic() - t < 15
    assert not wait_gone(tag, a.port, [a.proc.pid])


@pytest.mark.slow
def test_pipeline_sharding_over_mpi(model_cache):
    # mlx_lm's llama has no pipeline(); deepseek_v3 (demo-kimi) does. float32: MoE on Linux CPU.
    from runtime.demo_models import ensure

    kimi = ensure("demo-kimi", size="tiny", cache_dir=model_cache)
    tag = token()
    with AnchorCluster(kimi, builtin_local(), np=2, backend="mpi", sharding="pipeline", blas="bundled",
                       env={TAG_VAR: tag, **LOOPBACK_MPI}, ready_timeout=120) as a:
        assert "--pipeline" in a.argv
        check_blas(rank_processes(tag), "bundled")
        body = {"model": a.model_name, "prompt": "hello there", "max_tokens": 8, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(i): -1000 for i in eos_ids(kimi)}}
        assert stream_completion(a.base_url, body)["usage"]["completion_tokens"] == 8
    assert not wait_gone(tag, a.port, [a.proc.pid])


@pytest.mark.slow
def test_ring_over_ssh_hosts(llama, ssh_cluster):
    """Two "hosts" reached over real ssh (mlx.launch -> our ssh wrapper -> ssh -tt)."""
    hosts = [Host(h.alias, h.alias, ips=(h.ip,), slots=1, python=sys.executable) for h in ssh_cluster.hosts[:2]]
    hf = Hostfile(path="remote.yaml", ssh_config=str(ssh_cluster.ssh_config), hosts=hosts)
    tag = token()
    # --blas resolved on each host over ssh (blas_env.py runs launcher/blas.py there)
    with AnchorCluster(llama, hf, np=2, backend="ring", blas="auto", env={TAG_VAR: tag}, ready_timeout=120) as a:
        assert a.base_url.startswith(f"http://{ssh_cluster.hosts[0].ip}:")
        assert len(rank_processes(tag)) == 2
        assert set(a.blas_env) == {h.alias for h in ssh_cluster.hosts[:2]}
        for p in rank_processes(tag):  # each host has one rank: all its cores
            assert bool(openblas_mapped(p)) == bool(OPENBLAS)
            assert p.environ().get("OPENBLAS_NUM_THREADS") == (str(os.cpu_count()) if OPENBLAS else None)
        body = {"model": a.model_name, "prompt": "hello there", "max_tokens": 8, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(i): -1000 for i in eos_ids(llama)}}
        assert stream_completion(a.base_url, body)["usage"]["completion_tokens"] == 8
    assert not wait_gone(tag, a.port, [a.proc.pid])


CHILD = r"""
import json, sys, time
from pathlib import Path
from launcher.bench.anchor import AnchorCluster
from launcher.hostfile import builtin_local
a = AnchorCluster(Path(sys.argv[1]), builtin_local(), np=2, backend=sys.argv[2],
                  env={"EXOLAUNCH_BENCH_TAG": sys.argv[3], "OMPI_MCA_btl": "self,tcp"}, ready_timeout=120).start()
print(json.dumps({"port": a.port, "guard": a.proc.pid}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_sigkill_of_the_controller_takes_the_ranks_down(backend, llama):
    tag = token()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(llama), backend, tag], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, f"the controller died: {child.stderr.read()}"
        info = json.loads(line)
        assert len(rank_processes(tag)) == 2
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        left = wait_gone(tag, info["port"], [info["guard"]], timeout=8)
        assert not left, f"processes left behind after SIGKILL of the controller: {left}"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_missing_model_directory_fails_fast(tmp_path):
    t = time.monotonic()
    a = AnchorCluster(tmp_path / "no-such-model", builtin_local(), np=2, backend="mpi")
    with pytest.raises(LaunchError) as e:
        a.start()
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert "no-such-model" in msg and "does not exist" in msg and "Fix:" in msg
    assert a.proc is None  # nothing was spawned
    no_config = tmp_path / "empty"
    no_config.mkdir()
    with pytest.raises(LaunchError, match="no config.json"):
        AnchorCluster(no_config, builtin_local(), np=2, backend="ring").start()


@pytest.mark.slow
def test_model_that_does_not_load_is_a_launch_error_with_the_cause(llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama.iterdir():
        if f.is_file():
            (broken / f.name).symlink_to(f)
    config = json.loads((llama / "config.json").read_text())
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    tag = token()
    t = time.monotonic()
    a = AnchorCluster(broken, builtin_local(), np=2, backend="mpi", env={TAG_VAR: tag, **LOOPBACK_MPI},
                      ready_timeout=120)
    try:
        with pytest.raises(LaunchError) as e:
            a.start()
    finally:
        a.stop()
    assert time.monotonic() - t < 60
    first = str(e.value).splitlines()[0]
    assert first.startswith("anchor: mlx_lm.server on 2 rank(s) (mpirun, tensor)"), first
    assert "no_such_arch" in first and "Fix:" in first, first  # the cause, from the ranks' output
    assert "Last output:" in str(e.value)
    assert not wait_gone(tag, a.port, [a.proc.pid])


def test_launcher_not_installed_is_a_launch_error(llama, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="mpirun not found.*Fix: install OpenMPI"):
        AnchorCluster(llama, builtin_local(), np=2, backend="mpi").start()
    monkeypatch.setattr(anchor.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(LaunchError, match="mlx.launch not found.*Fix:"):
        AnchorCluster(llama, builtin_local(), np=2, backend="ring").start()


def test_bad_arguments_are_config_errors_from_start(llama):
    bad = [dict(backend="jaccl"), dict(backend="mpi", sharding="expert"), dict(backend="mpi", env={"A-B": "1"}),
           dict(backend="mpi", hostfile=Hostfile(path="h.yaml", hosts=[Host("a", "local", slots=1)])),
           dict(backend="mpi", blas="fast")]
    for kw, match in zip(bad, ["backend", "sharding", "A-B", "slots", "--blas 'fast'"]):
        a = AnchorCluster(llama, kw.pop("hostfile", builtin_local()), np=2, **kw)  # constructing never fails
        with pytest.raises(ConfigError, match=match):
            a.start()
        assert a.proc is None and a.stop() == 0


def test_version():
    v = anchor_version()
    assert set(v) == {"mlx-lm", "mlx"} and all(v.values())


# ----------------------------------------------------------------------------- dry checks


def remote_hostfile(tmp_path) -> Hostfile:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host h1\n  HostName 127.0.0.2\n")
    return Hostfile(path="h.yaml", ssh_config=str(cfg), hosts=[
        Host("local", "local", slots=1),
        Host("h1", "h1", ips=("127.0.0.2",), slots=2, python="/opt/py/bin/python3"),
        Host("h2", "root@127.0.0.3", port=2222, slots=1, python="/opt/py/bin/python3"),
    ])


def test_mpi_command_for_remote_hosts(llama, tmp_path):
    hf = remote_hostfile(tmp_path)
    a = AnchorCluster(llama, hf, np=3, backend="mpi", port=8123, env={TAG_VAR: "t1", "A": "b c"})
    assert [(h.name, h.slots) for h in a.hostfile.hosts] == [("local", 1), ("h1", 2)]
    argv, own, _ = a._commands(tmp_path)
    cmd = " ".join(argv)
    assert "--bind-to none" in cmd and ("--oversubscribe" in cmd or ":OVERSUBSCRIBE" in cmd)
    assert "--output" not in argv  # what mlx.launch --backend mpi passes and OpenMPI 4 rejects
    assert ["-x", f"{TAG_VAR}=t1"] == argv[argv.index(f"{TAG_VAR}=t1") - 1:argv.index(f"{TAG_VAR}=t1") + 1]
    assert "A=b c" in argv and "HF_HUB_OFFLINE=1" in argv
    assert (tmp_path / "mpi-hostfile").read_text() == "localhost slots=1\nh1 slots=2\n"
    agent = argv[argv.index("plm_rsh_agent") + 1] if "plm_rsh_agent" in argv else argv[argv.index("plm_ssh_agent") + 1]
    wrapper = Path(agent).read_text()
    assert "-F " + hf.ssh_config in wrapper and "BatchMode=yes" in wrapper
    i = argv.index(":")
    assert argv[argv.index("--host"):argv.index("--host") + 2] == ["--host", "localhost:1"]
    assert argv[i + 1:i + 5] == ["-np", "2", "--host", "h1:2"] and argv[i + 5] == "/opt/py/bin/python3"
    assert argv[-8:] == ["-m", "mlx_lm.server", "--model", a.model_name, "--host", "127.0.0.1", "--port", "8123"]
    assert TAG_VAR not in own  # mpirun itself is not a rank
    # BLAS variables that differ per host go in front of that host's command, not in a global -x
    argv, _, _ = anchor._mpi_command(a.hostfile, ["--port", "1"], {}, tmp_path, {"h1": {"LD_PRELOAD": "/x.so"}})
    i = argv.index(":")
    assert "env" not in argv[:i] and argv[i + 5:i + 8] == ["env", "LD_PRELOAD=/x.so", "/opt/py/bin/python3"]
    if os.geteuid() == 0:
        assert own["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and own["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"


def test_ring_command_for_remote_hosts(llama, tmp_path):
    hf = remote_hostfile(tmp_path)
    hf.hosts[0] = Host("local", "local", slots=1, python="/opt/py/bin/python3")
    a = AnchorCluster(llama, hf, np=4, backend="ring", sharding="pipeline", data_port=40000, env={TAG_VAR: "t2"})
    argv, own, _ = a._commands(tmp_path)
    spec = json.loads((tmp_path / "mlx-hostfile.json").read_text())
    assert spec["hosts"] == [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},  # the one name run without ssh
                             {"ssh": "h1", "ips": ["127.0.0.2"]}, {"ssh": "h1", "ips": ["127.0.0.2"]},
                             {"ssh": "ssh://root@127.0.0.3:2222", "ips": ["127.0.0.3"]}]
    assert f"{TAG_VAR}=t2" in spec["envs"] and not any("t2" in x for x in argv)  # not on mlx.launch's argv
    assert argv[argv.index("--starting-port") + 1] == "40000"
    assert argv[argv.index("--") + 1:argv.index("--") + 4] == ["/opt/py/bin/python3", "-m", "mlx_lm.server"]
    assert argv[-1] == "--pipeline"
    assert own["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert (tmp_path / "bin" / "ssh").stat().st_mode & 0o111
    # rank 0 is local: served on loopback
    assert a.base_url.startswith("http://127.0.0.1:")


def test_ring_needs_one_interpreter(llama, tmp_path):
    hf = remote_hostfile(tmp_path)  # local uses this interpreter, h1 /opt/py/...
    a = AnchorCluster(llama, hf, np=2, backend="ring")
    with pytest.raises(LaunchError, match="same `python:`"):
        a._commands(tmp_path)


def test_one_ring_rank_runs_the_server_without_mlx_launch(llama, tmp_path):
    a = AnchorCluster(llama, builtin_local(), np=1, backend="ring", env={TAG_VAR: "t3"})
    argv, own, _ = a._commands(tmp_path)
    assert argv[:3] == [sys.executable, "-m", "mlx_lm.server"] and own[TAG_VAR] == "t3"


def test_blas_env_on_a_remote_host_is_what_blas_py_says_there():
    """The snippet blas_env.py sends to remote hosts runs launcher/blas.py itself (here on the
    local host through launcher.remote, as over ssh)."""
    import inspect

    from launcher import ssh
    from launcher.bench import blas_env, probes
    from runtime.contract import ENV_BLAS, ENV_LOCAL_WORLD_SIZE

    for mode, local in (("auto", 2), ("bundled", 1), ("openblas", 3), ("/no/such/libblas.so", 1)):
        env = {ENV_BLAS: mode, ENV_LOCAL_WORLD_SIZE: str(local)}
        got = probes.run_probe(builtin_local().hosts[0], blas_env._REMOTE,
                               {"names": [ENV_BLAS, ENV_LOCAL_WORLD_SIZE], "env": env, "inherited": [],
                                "source": inspect.getsource(blas)}, ssh.SshOptions())
        add, error = blas.rank_env(env)
        assert (got["add"], got["error"]) == (add, error), mode
    assert blas_env.host_env(builtin_local().hosts[0], "bundled", 2, ssh.SshOptions()) == {
        "OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    with pytest.raises(LaunchError, match="does not exist.*Fix:"):
        blas_env.host_env(builtin_local().hosts[0], "/no/such/libblas.so", 2, ssh.SshOptions())
