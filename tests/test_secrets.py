"""No secret on any command line, and none in --dry-run's output.

Secrets: the API key, the per-job control-channel secret, and whatever the user forwards that is
named like one (HF_TOKEN, *_PASSWORD, ...). A value counts as shown if it appears in an argv
as is or inside anything base64-encoded there (how the MPI backend used to carry rank env).
"""

from __future__ import annotations

import base64
import binascii
import re
import subprocess
import uuid

import httpx
import psutil
import pytest

from runtime import contract
from tests.launch_helpers import ServingCluster, env_for_tests, run, yaml_hostfile

B64 = re.compile(r"[A-Za-z0-9+/=]{40,}")


def _secret() -> str:
    return "s3cr3t" + uuid.uuid4().hex


def _shown(text: str, secrets: list[str]) -> list[str]:
    """The secrets that `text` shows, plainly or base64-encoded."""
    decoded = []
    for blob in B64.findall(text):
        try:
            decoded.append(base64.b64decode(blob + "=" * (-len(blob) % 4)).decode(errors="replace"))
        except (binascii.Error, ValueError):
            pass
    return [s for s in secrets if s in text or any(s in d for d in decoded)]


# ------------------------------------------------------------------------- --dry-run


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_dry_run_hides_every_secret(tmp_path, backend):
    key, token, password, arg = _secret(), _secret(), _secret(), _secret()
    env_file = tmp_path / "job.env"
    env_file.write_text(f"DB_PASSWORD={password}\nPLAIN=visible\n")
    env = env_for_tests(**{contract.ENV_API_KEY: key, "HF_TOKEN": token})
    r = run("run", "demo-llama:tiny", "--backend", backend, "--dry-run", "-x", "HF_TOKEN", "--env-file", str(env_file),
            env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert not _shown(out, [key, token, password])
    assert f"{contract.ENV_API_KEY}=<hidden>" in out and "HF_TOKEN=<hidden>" in out
    assert f"{contract.ENV_JOB_SECRET}=<hidden>" in out and "DB_PASSWORD=<hidden>" in out
    assert "PLAIN=visible" in out
    # A secret given to the program itself: after a flag named like one, or as NAME=value.
    r = run("exec", "--backend", backend, "--dry-run", "--", "python", "x.py", "--api-key", arg,
            f"--hf-token={arg}", f"MY_SECRET={arg}", "--max-tokens", "5", env=env)
    assert r.returncode == 0, r.stderr
    assert not _shown(r.stdout + r.stderr, [arg])
    assert "--api-key <hidden> --hf-token=<hidden> MY_SECRET=<hidden> --max-tokens 5" in r.stdout


def test_dry_run_over_ssh_hides_secrets():
    key = _secret()
    r = run("--hostfile", "hostfiles/tb5.yaml", "exec", "--backend", "ring", "--dry-run", "-x",
            f"{contract.ENV_API_KEY}={key}", "--", "python", "x.py", key)
    assert r.returncode == 0, r.stderr
    assert "ssh -o BatchMode=yes" in r.stdout and not _shown(r.stdout + r.stderr, [key])


# ------------------------------------------------------------------------- the API warning


def test_api_on_the_network_without_a_key_warns_once():
    def api_warnings(*args, env=None) -> list[str]:
        r = run("run", "demo-llama:tiny", *args, "--dry-run", env=env)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stderr.splitlines() if "warning" in line and "API" in line]

    (warning,) = api_warnings("--host", "0.0.0.0")
    assert "0.0.0.0" in warning and contract.ENV_API_KEY in warning and "--api-key" in warning
    assert not api_warnings()
    assert not api_warnings("--host", "0.0.0.0", env=env_for_tests(**{contract.ENV_API_KEY: _secret()}))


# ------------------------------------------------------------------------- ps, while a job runs


def _job_secret(c: ServingCluster) -> str:
    for pid in c.rank_pids():
        return psutil.Process(pid).environ()[contract.ENV_JOB_SECRET]
    raise AssertionError("no rank found")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "ssh"])
def test_no_secret_on_any_command_line_with_mpi(where, model_cache, tmp_path, request):
    key, token = _secret(), _secret()
    hostfile = None
    if where == "ssh":
        cluster = request.getfixturevalue("ssh_cluster")
        hostfile = yaml_hostfile(tmp_path / "h.yaml", cluster, {"h1": 1, "h2": 1})
    with ServingCluster("demo-llama:tiny", "--backend", "mpi", "-x", "HF_TOKEN", hostfile=hostfile,
                        cache=model_cache, env={contract.ENV_API_KEY: key, "HF_TOKEN": token}) as c:
        secrets = [key, token, _job_secret(c)]
        # -ww: unlimited width (ps may cut lines to the terminal's, and an encoded blob with them)
        ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert "launcher.agent --mpi" in ps and "mpirun" in ps  # the job's processes were there to see
        assert not _shown(ps, secrets), [line for line in ps.splitlines() if _shown(line, secrets)]
        body = {"model": "demo-llama:tiny", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{c.base_url}/completions", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{c.base_url}/completions", json=body, timeout=60, headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
        c.stop()
