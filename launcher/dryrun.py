"""`--dry-run`: what would start where, with which argv, env and files; nothing is started.

Secret values are never printed: environment variables named like a secret (API key, job
secret, tokens, passwords), the value after a command-line flag named so, and the mpirun
variables that carry the ranks' environment; any other place a secret value appears is masked too.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

from launcher import ssh
from launcher.agent import MPI_SPEC_ENV
from launcher.backends import LaunchSpec
from launcher.backends import mpi as mpi_backend


SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD", re.I)  # never print these values
SECRET_FLAG = re.compile(r"-{1,2}[\w.-]*(key|token|secret|password|passwd)", re.I)  # not --max-tokens
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")  # HF_TOKEN=V as `env` takes it (ssh's -o HostKey... are CamelCase)
HIDDEN = "<hidden>"


def _hidden(name: str, value: str) -> str:
    return HIDDEN if SECRET.search(name) or name.startswith(MPI_SPEC_ENV) else shlex.quote(value)


def _argv(argv: list[str]) -> str:
    """shlex.join, with the value of every secret-named flag or assignment hidden."""
    out, hide_next = [], False
    for a in argv:
        name, eq, _ = a.partition("=")
        flag = SECRET_FLAG.fullmatch(name)
        if hide_next:
            out.append(HIDDEN)
        elif eq and (flag or (ENV_NAME.fullmatch(name) and SECRET.search(name))):
            out.append(shlex.quote(name) + "=" + HIDDEN)
        else:
            out.append(shlex.quote(a))
        hide_next = bool(flag) and not eq and not hide_next
    return " ".join(out)


def _mask(text: str, launch: LaunchSpec) -> str:
    """Mask secret values wherever else they appear (a positional argument, a cwd, ...)."""
    values = {v for s in launch.ranks for k, v in s.env.items() if SECRET.search(k) and len(v) >= 6}
    for v in sorted(values, key=len, reverse=True):
        text = text.replace(shlex.quote(v), HIDDEN).replace(v, HIDDEN)
    return text


def describe(launch: LaunchSpec, sopts: ssh.SshOptions) -> str:
    hf = launch.hostfile
    lines = [f"backend {launch.backend}, {launch.world_size} rank(s) from {hf.label}"]
    sopts = ssh.SshOptions(
        connect_timeout=sopts.connect_timeout, host_key_check=sopts.host_key_check,
        config=sopts.config or hf.ssh_config,
        options={**(hf.ssh_options or {}), **(sopts.options or {})},
    )
    if launch.backend == "mpi":
        with tempfile.TemporaryDirectory(prefix="exl-") as d:
            argv, env = mpi_backend.mpirun_command(
                launch, ssh_agent=ssh.base_argv(sopts), workdir=Path(d), grace=5.0, heartbeat=1.0)
            lines.append("mpirun hostfile:")
            lines += ["  " + line for line in mpi_backend.hostfile_text(launch).splitlines()]
        lines.append("start: " + " ".join(f"{k}={_hidden(k, v)}" for k, v in env.items()) + (" " if env else "")
                     + _argv(argv))
    for s in launch.ranks:
        lines.append(f"rank {s.rank} on {s.host.name} (local rank {s.local_rank}, "
                     f"{'local' if s.host.is_local else 'ssh ' + s.host.ssh})")
        if launch.backend != "mpi":
            start = [s.python, "-m", "launcher.agent"] if s.host.is_local else ssh.agent_argv(
                sopts, s.host, s.python, control_path=f"<job-dir>/c-{s.host.name}")
            lines.append("  start: " + _argv(start))
        lines.append("  argv:  " + _argv(s.argv))
        if s.cwd:
            lines.append(f"  cwd:   {s.cwd}")
        for k in sorted(s.env):
            lines.append(f"  env:   {k}={_hidden(k, s.env[k])}")
        for k, content in sorted(s.files.items()):
            lines.append(f"  file:  {k} -> {json.dumps(json.loads(content))}")
    return _mask("\n".join(lines), launch)
