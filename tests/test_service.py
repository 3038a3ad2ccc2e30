"""`exolaunch service`: the launchd plist and the systemd user unit, install/uninstall in a temp
HOME, and the service's own command line and environment serving a real cluster."""

from __future__ import annotations

import os
import plistlib
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.launch_helpers import ROOT, env_for_tests, free_port, run, token

MODEL = "demo-llama:tiny"


@pytest.fixture
def home(tmp_path, model_cache):
    h = tmp_path / "home"
    h.mkdir()
    env = env_for_tests(HOME=str(h), EXOLAUNCH_CACHE=str(model_cache), EXOLAUNCH_API_KEY="sk-test-secret-42")
    for k in ("XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        env.pop(k, None)
    return h, env


def test_plist_parses_and_has_the_launchd_keys(home):
    h, env = home
    r = run("--hostfile", "hostfiles/localhost.yaml", "service", "install", "web", "--print", "--platform", "macos",
            "--", MODEL, "-n", "2", "--port", "8000", "-x", "EXOLAUNCH_CACHE", env=env)
    assert r.returncode == 0, r.stderr
    doc = plistlib.loads(r.stdout.encode())
    assert doc["Label"] == "exolaunch.web"
    argv = doc["ProgramArguments"]
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    # The global --hostfile is kept, made absolute (a service does not start in this directory).
    assert argv[1:] == ["--hostfile", str(ROOT / "hostfiles/localhost.yaml"), "run", MODEL, "-n", "2", "--port", "8000",
                        "-x", "EXOLAUNCH_CACHE"]
    assert doc["RunAtLoad"] is True and doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["StandardOutPath"] == doc["StandardErrorPath"] == str(h / "Library/Logs/exolaunch/web.log")
    assert doc["WorkingDirectory"] == str(ROOT)
    e = doc["EnvironmentVariables"]
    assert e["PATH"] == env["PATH"] and e["HOME"] == str(h) and e["EXOLAUNCH_CACHE"] == env["EXOLAUNCH_CACHE"]
    assert e["EXOLAUNCH_API_KEY"] == "<hidden>" and "sk-test-secret-42" not in r.stdout  # --print hides secrets
    assert not (h / "Library").exists()  # --print writes nothing


def test_systemd_unit_passes_systemd_analyze_verify(home, tmp_path):
    h, env = home
    r = run("service", "install", "web", "--no-start", "--platform", "linux",
            "--setenv", 'WEIRD=a b "c" 100% $HOME \\x', "--",
            MODEL, "-n", "2", "-x", "GREETING=hello world %d $USER", env=env)
    assert r.returncode == 0, r.stderr
    unit = h / ".config/systemd/user/exolaunch-web.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o600  # it holds EXOLAUNCH_API_KEY
    text = unit.read_text()
    assert "Restart=on-failure" in text and "KillSignal=SIGINT" in text and "WantedBy=default.target" in text
    assert 'Environment="EXOLAUNCH_API_KEY=sk-test-secret-42"' in text
    assert 'Environment="WEIRD=a b \\"c\\" 100%% $HOME \\\\x"' in text
    assert '"GREETING=hello world %%d $$USER"' in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert os.path.isabs(exec_start.split("=", 1)[1].split()[0])
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and not v.stderr.strip() and not v.stdout.strip(), v.stdout + v.stderr


def _user_bus() -> bool:
    try:
        return subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_install_status_logs_uninstall_round_trip(home):
    h, env = home
    r = run("service", "install", "web", "--", MODEL, "-n", "2", env=env)
    unit = h / ".config/systemd/user/exolaunch-web.service"
    assert unit.exists(), r.stderr
    if not _user_bus():  # this container: the file stays, and exolaunch says why it is not running
        assert r.returncode == 1
        assert "not started: no systemd user instance here" in r.stderr
        assert "systemctl --user enable --now exolaunch-web.service" in r.stderr
    assert run("service", "list", env=env).stdout.split() == ["web", str(unit)]
    st = run("service", "status", "web", env=env)
    assert st.returncode == 3, st.stdout + st.stderr
    lg = run("service", "logs", "web", env=env)
    assert lg.returncode == 0 and "no output yet" in lg.stderr
    u = run("service", "uninstall", "web", env=env)
    assert u.returncode == 0 and "removed service web" in u.stderr
    assert not unit.exists()
    again = run("service", "uninstall", "web", env=env)
    assert again.returncode == 2 and "service 'web': not installed" in again.stderr

    # The same round trip for a launchd agent (not loaded: this is not a Mac).
    r = run("service", "install", "web", "--platform", "macos", "--", MODEL, env=env)
    agent = h / "Library/LaunchAgents/exolaunch.web.plist"
    assert r.returncode == 1 and "not loaded: this is not a macos machine" in r.stderr
    assert plistlib.loads(agent.read_bytes())["Label"] == "exolaunch.web"
    assert run("service", "uninstall", "web", "--platform", "macos", env=env).returncode == 0
    assert not agent.exists()


@pytest.mark.parametrize("args, needle", [
    (("install", "bad name", "--print"), "service NAME 'bad name': expected"),
    (("install", "../etc", "--print"), "service NAME '../etc': expected"),
    (("install", "web", "--print", "--platform", "windows"), "--platform 'windows': expected macos or linux"),
    (("install", "web", "--print", "--", "-d", MODEL), "-d/--detach in a service's run arguments"),
    (("install", "web", "--print", "--setenv", "NOEQUALS"), "--setenv 'NOEQUALS': expected KEY=VALUE"),
    (("status", "nosuch"), "service 'nosuch': not installed"),
])
def test_bad_input_is_one_line_and_exit_2(home, args, needle):
    r = run("service", *args, env=home[1])
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_misspelt_run_flag_fails_at_install_not_in_the_service(home):
    r = run("service", "install", "web", "--", MODEL, "--no-such-flag", env=home[1])
    assert r.returncode == 2 and "No such option: --no-such-flag" in r.stderr
    assert not (home[0] / ".config").exists()


@pytest.mark.slow
def test_the_service_command_serves_with_only_its_own_environment(home):
    """What launchd would start: ProgramArguments in WorkingDirectory with EnvironmentVariables and
    nothing else; it serves, and launchd's SIGTERM stops every rank."""
    h, env = home
    port, tok = free_port(), token()
    r = run("service", "install", "web", "--no-start", "--platform", "macos", "--setenv", f"EXOLAUNCH_TEST_TOKEN={tok}",
            "--", MODEL, "-n", "2", "--port", str(port), "-x", "EXOLAUNCH_TEST_TOKEN", env=env)
    assert r.returncode == 0, r.stderr
    doc = plistlib.loads((h / "Library/LaunchAgents/exolaunch.web.plist").read_bytes())
    log = Path(doc["StandardOutPath"])
    assert log.parent.is_dir()
    with open(log, "ab") as out:
        proc = subprocess.Popen(doc["ProgramArguments"], cwd=doc["WorkingDirectory"], env=doc["EnvironmentVariables"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 180
        while "exolaunch: serving" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10,
                          headers={"Authorization": "Bearer sk-test-secret-42"})
        assert ready.status_code == 200, ready.text
        logs = run("service", "logs", "web", "--platform", "macos", "-n", "50", env=env)
        assert f"serving {MODEL} on 2 rank(s)" in logs.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 128 + signal.SIGTERM, log.read_text()
    from tests.test_jobs import _wait_no_ranks

    _wait_no_ranks(tok, timeout=10)
    assert "all 2 ranks stopped" in log.read_text()

