"""`exolaunch doctor` against real loopback sshd hosts (tests/sshd.py), and its judging rules."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.doctor import HostCheck as HostResult, judge
from launcher.hostfile import Host
from tests.launch_helpers import free_port, run


def _free_range(ips: list[str], n: int = 4) -> int:
    """A port P with P-1 .. P+n free on every ip (the ring takes consecutive ports)."""
    for _ in range(50):
        p = free_port()
        if p + n > 65535:
            continue
        ok = True
        for ip in ips:
            for q in range(p - 1, p + n):
                with socket.socket() as s:
                    try:
                        s.bind((ip, q))
                    except OSError:
                        ok = False
        if ok:
            return p
    raise AssertionError("no free port range")


def _hostfile(path: Path, cluster, hosts: list[str], *, port: int, python: dict | None = None,
              extra: str = "", backend: str | None = None) -> Path:
    by = {h.alias: h for h in cluster.hosts}
    lines = [f"ssh_config: {cluster.ssh_config}", f"port: {port}"]
    if backend:
        lines.append(f"backend: {backend}")
    lines.append("hosts:")
    for alias in hosts:
        py = (python or {}).get(alias, sys.executable)
        lines.append(f"  - {{name: {alias}, ssh: {alias}, ips: [{by[alias].ip}], python: {py}}}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _problem_lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if " -> fix: " in line]


# ----------------------------------------------------------------------------- real hosts


def test_all_good_two_hosts(ssh_cluster, tmp_path):
    port = _free_range([h.ip for h in ssh_cluster.hosts[:2]])
    hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1", "h2"], port=port)
    r = run("--hostfile", str(hf), "doctor", "--connect-timeout", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["HOST", "SSH", "RTT", "SKEW", "PYTHON"]
    from importlib import metadata

    for alias in ("h1", "h2"):
        row = next(line for line in lines if line.startswith(alias + " "))
        assert " ok " in row and " ms " in row, row
        for pkg in ("mlx", "mlx-lm", "exolaunch"):
            assert metadata.version(pkg) in row, (pkg, row)
    assert "all checks passed on 2 host(s)" in r.stdout
    assert not _problem_lines(r.stdout)


def test_json_report_has_rtt_skew_and_ports(ssh_cluster, tmp_path):
    port = _free_range([h.ip for h in ssh_cluster.hosts[:2]])
    hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1", "h2"], port=port)
    r = run("--hostfile", str(hf), "doctor", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and [h["name"] for h in rep["hosts"]] == ["h1", "h2"]
    h1, h2 = rep["hosts"]
    assert 0 <= h1["rtt_ms"] < 1000 and abs(h1["skew_s"]) < 0.5
    # ring: one port per rank, consecutive from the hostfile's port, on each host's own IP
    assert [(p["ip"], p["port"], p["status"]) for p in h1["info"]["ports"]] == [("127.0.0.2", port, "free")]
    assert [(p["ip"], p["port"], p["status"]) for p in h2["info"]["ports"]] == [("127.0.0.3", port + 1, "free")]
    assert h1["info"]["memory"]["total"] > 0 and h1["info"]["memory"]["usable"] > 0
    assert h1["info"]["disk"]["hf"]["free"] > 0


def test_unreachable_host_named_with_ssh_error(ssh_cluster, tmp_path):
    port = _free_range(["127.0.0.2"])
    extra = f"  - {{name: ghost, ssh: 127.0.0.9, port: {ssh_cluster.port}, ips: [127.0.0.9], python: {sys.executable}}}\n"
    hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1"], port=port, extra=extra)
    t0 = time.monotonic()
    r = run("--hostfile", str(hf), "doctor", "--connect-timeout", "3")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 6, took
    problems = _problem_lines(r.stdout)
    assert len(problems) == 1, r.stdout
    assert problems[0].startswith("ghost: unreachable over SSH (127.0.0.9)")
    assert "Connection refused" in problems[0]
    assert "FAIL" in next(line for line in r.stdout.splitlines() if line.startswith("ghost "))
    assert any(line.startswith("h1 ") and " ok " in line for line in r.stdout.splitlines())


def test_silent_host_times_out_within_connect_timeout(ssh_cluster, tmp_path):
    # Accepts TCP connections (the kernel does) but never says a word: ssh waits for the banner.
    with socket.socket() as silent:
        silent.bind(("127.0.0.9", 0))
        silent.listen(8)
        sport = silent.getsockname()[1]
        extra = f"  - {{name: mute, ssh: 127.0.0.9, port: {sport}, python: {sys.executable}}}\n"
        hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1"], port=_free_range(["127.0.0.2"]), extra=extra)
        t0 = time.monotonic()
        r = run("--hostfile", str(hf), "doctor", "--connect-timeout", "3")
        took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 6, took
    (line,) = _problem_lines(r.stdout)
    assert line.startswith("mute: unreachable over SSH") and "timed out" in line, line


def _make_stub_venv(root: Path) -> Path:
    """A venv over this interpreter's packages with its own mlx-lm 0.0.1 installed in it.

    The stub is installed the way a wheel install lays it out (package + .dist-info with
    METADATA and RECORD), written directly: this machine has no `wheel` to build one offline."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, capture_output=True, timeout=60)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, timeout=30).stdout.strip())
    (site / "mlx_lm").mkdir(parents=True)
    (site / "mlx_lm" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    info = site / "mlx_lm-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-lm\nVersion: 0.0.1\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "top_level.txt").write_text("mlx_lm\n")
    (info / "RECORD").write_text("mlx_lm/__init__.py,,\nmlx_lm-0.0.1.dist-info/METADATA,,\n"
                                 "mlx_lm-0.0.1.dist-info/INSTALLER,,\nmlx_lm-0.0.1.dist-info/top_level.txt,,\n"
                                 "mlx_lm-0.0.1.dist-info/RECORD,,\n")
    check = subprocess.run([str(py), "-c", "from importlib.metadata import version; print(version('mlx-lm'))"],
                           capture_output=True, text=True, timeout=30)
    assert check.stdout.strip() == "0.0.1", check.stdout + check.stderr
    return py


def test_version_mismatch_names_hosts_versions_and_fix(ssh_cluster, tmp_path):
    from importlib import metadata

    py2 = _make_stub_venv(tmp_path)
    port = _free_range([h.ip for h in ssh_cluster.hosts[:3]])
    hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1", "h2", "h3"], port=port, python={"h2": str(py2)})
    r = run("--hostfile", str(hf), "doctor")
    assert r.returncode == 1, r.stdout + r.stderr
    real = metadata.version("mlx-lm")
    (line,) = _problem_lines(r.stdout)
    assert line.startswith(f"h2: mlx-lm 0.0.1, but {real} on h1"), line
    assert f"fix: {py2} -m pip install mlx-lm=={real}" in line, line
    row = next(x for x in r.stdout.splitlines() if x.startswith("h2 "))
    assert "0.0.1" in row


def test_port_in_use_is_reported(ssh_cluster, tmp_path):
    import os

    port = _free_range([h.ip for h in ssh_cluster.hosts[:2]])
    hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1", "h2"], port=port)
    with socket.socket() as s:
        s.bind(("127.0.0.3", port + 1))  # h2's ring port
        s.listen(1)
        r = run("--hostfile", str(hf), "doctor")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = _problem_lines(r.stdout)
    assert line.startswith(f"h2: port 127.0.0.3:{port + 1} is in use by pid {os.getpid()}"), line
    assert f"kill {os.getpid()}" in line and "--port" in line
    # ...and which ports are free there instead: a --data-port that clears the busy one
    first, last, data_port = map(int, re.search(r"ports (\d+)-(\d+) are free on h2: --data-port (\d+)", line).groups())
    assert first > port + 1 and last - first == 2 and data_port == first + 1, line


def test_bad_python_on_host(ssh_cluster, tmp_path):
    port = _free_range(["127.0.0.2"])
    hf = _hostfile(tmp_path / "hosts.yaml", ssh_cluster, ["h1"], port=port, python={"h1": "/nonexistent/python3"})
    r = run("--hostfile", str(hf), "doctor", "-n", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    (line,) = _problem_lines(r.stdout)
    assert line.startswith("h1: python /nonexistent/python3 does not run") and "python:" in line, line


def test_builtin_local_hostfile_without_ssh(tmp_path):
    port = _free_range(["127.0.0.1"])
    env_path = "/nonexistent-ssh-dir"
    import os

    from tests.launch_helpers import env_for_tests

    env = env_for_tests(PATH=f"{env_path}:{os.path.dirname(sys.executable)}:/usr/bin:/bin")
    env.pop("EXOLAUNCH_HOSTFILE", None)
    r = run("doctor", "--port", str(port), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(x for x in r.stdout.splitlines() if x.startswith("local "))
    assert row.split()[1] == "local" and "2 free" in row
    assert "all checks passed on 1 host(s)" in r.stdout


def test_bad_flags_are_config_errors():
    r = run("doctor", "--connect-timeout", "0")
    assert r.returncode == 2 and "--connect-timeout" in r.stderr


# ----------------------------------------------------------------------------- judging rules (no I/O)


def _res(name, *, python="3.11.7", versions=None, platform="linux", **kw) -> HostResult:
    info = {"python": python, "executable": "/py", "platform": platform, "agent": True,
            "versions": versions or {"mlx": "0.32.4", "mlx-lm": "0.32.2", "exolaunch": "0.1.0"},
            "memory": {"total": 64 << 30, "usable": 48 << 30, "rule": "MemAvailable"},
            "disk": {"hf": {"path": "/c", "free": 500 << 30}}, "ports": []}
    info.update(kw.pop("info", {}))
    return HostResult(name=name, ssh=name, python="/py", reachable=True, probed=True, rtt_ms=1.0,
                      skew_s=kw.pop("skew_s", 0.0), info=info, **kw)


LOCAL = {"mlx": "0.32.4", "mlx-lm": "0.32.2", "exolaunch": "0.1.0"}


def _judge(results, backend="ring", hosts=None, **kw):
    hosts = hosts or {r.name: Host(name=r.name, ssh=r.name) for r in results}
    return judge(results, hosts, backend=backend, local=LOCAL, **kw)


def test_judge_majority_version_and_missing_package():
    odd = {"mlx": "0.31.0", "mlx-lm": "0.32.2", "exolaunch": "0.1.0"}
    none = {"mlx": "0.32.4", "mlx-lm": None, "exolaunch": "0.1.0"}
    ps = _judge([_res("a", versions=odd), _res("b"), _res("c"), _res("d", versions=none)])
    lines = [p.line() for p in ps]
    assert lines == [
        "a: mlx 0.31.0, but 0.32.4 on b (mismatched ranks fail in confusing ways) -> fix: /py -m pip install 'mlx[cpu]==0.32.4'",
        "d: mlx-lm is not installed for /py -> fix: /py -m pip install mlx-lm==0.32.2",
    ]


def test_judge_exolaunch_must_match_this_machine_and_python_minor():
    ps = _judge([_res("a", versions={**LOCAL, "exolaunch": "0.0.9"}), _res("b", python="3.12.1")])
    whats = [(p.host, p.what) for p in ps]
    assert ("a", "exolaunch 0.0.9, but 0.1.0 on this machine (the launcher and its agents must match)") in whats
    assert any(h == "b" and w.startswith("Python 3.12.1, but 3.11 on a") for h, w in whats)


def test_judge_skew_memory_rdma_mpi():
    mac = {"platform": "darwin", "os": "macOS 26.2",
           "memory": {"total": 192 << 30, "usable": 144 << 30, "rule": "macOS default", "wired_limit_mb": 0},
           "rdma": {"rc": 0, "status": "disabled", "devices": ["rdma_en3"]}}
    hosts = {"a": Host(name="a", ssh="a", memory_gb=256, rdma={"b": "rdma_en5"}), "b": Host(name="b", ssh="b")}
    ps = _judge([_res("a", info=mac, skew_s=2.5), _res("b", info=mac)], backend="jaccl", hosts=hosts,
                rdma_devices={"a": ["rdma_en5"], "b": ["rdma_en3"]})
    errs = [p.line() for p in ps if p.severity == "error"]
    warns = [p.line() for p in ps if p.severity == "warning"]
    assert "a: clock is 2.5 s ahead of this machine's -> fix: sudo sntp -sS time.apple.com" in errs
    assert any(x.startswith("a: hostfile says memory_gb: 256 but the host has 192 GB") for x in errs)
    assert sum("RDMA is not enabled" in x and "rdma_ctl enable" in x for x in errs) == 2
    assert any(x.startswith("a: RDMA device(s) rdma_en5") for x in errs)
    assert not any(x.startswith("b: RDMA device(s)") for x in errs)
    assert sum(f"sudo sysctl iogpu.wired_limit_mb={192 * 1024 - 8192}" in x for x in warns) == 2
    ps = _judge([_res("a", info={"mpi": {"mpirun": None, "orted": None, "prted": None}})], backend="mpi")
    assert [p.line() for p in ps] == ["a: OpenMPI is not on PATH (no mpirun / orted / prted) -> fix: sudo apt-get install openmpi-bin"]


def test_judge_ssh_fixes():
    dead = HostResult(name="x", ssh="me@x", python="/py", error="me@x: Permission denied (publickey).")
    (p,) = _judge([dead])
    assert p.line().startswith("x: unreachable over SSH (me@x): me@x: Permission denied") and "ssh-copy-id me@x" in p.fix and "ssh me@x true" in p.fix


def test_run_checks_api_for_run_control_and_api_ports():
    """What `run` calls before starting: control channel (port - 1) and the API port are checked too."""
    from launcher.doctor import run_checks
    from launcher.hostfile import builtin_local

    port = _free_range(["127.0.0.1"])
    with socket.socket() as api:
        api.bind(("127.0.0.1", 0))
        api.listen(1)
        api_port = api.getsockname()[1]
        rep = run_checks(builtin_local(2), None, backend="ring", data_port=port, control=True,
                         ports={"local": [("127.0.0.1", api_port)]}, connect_timeout=3)
    (h,) = rep.hosts
    assert [(p["port"], p["status"]) for p in h.info["ports"]] == \
        [(port, "free"), (port + 1, "free"), (port - 1, "free"), (api_port, "in use")]
    assert not rep.ok and [p.host for p in rep.errors] == ["local"]
    assert f"port 127.0.0.1:{api_port} is in use" in rep.render()
