"""`--dry-run`: what would start where, with which argv, env and files; nothing is started."""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

from launcher import ssh
from launcher.backends import LaunchSpec
from launcher.backends import mpi as mpi_backend


SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)  # never print these values


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
        lines.append("start: " + " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shlex.join(argv))
    for s in launch.ranks:
        lines.append(f"rank {s.rank} on {s.host.name} (local rank {s.local_rank}, "
                     f"{'local' if s.host.is_local else 'ssh ' + s.host.ssh})")
        if launch.backend != "mpi":
            start = [s.python, "-m", "launcher.agent"] if s.host.is_local else ssh.agent_argv(
                sopts, s.host, s.python, control_path=f"<job-dir>/c-{s.host.name}")
            lines.append("  start: " + shlex.join(start))
        lines.append("  argv:  " + shlex.join(s.argv))
        if s.cwd:
            lines.append(f"  cwd:   {s.cwd}")
        for k in sorted(s.env):
            value = "<hidden>" if SECRET.search(k) else shlex.quote(s.env[k])
            lines.append(f"  env:   {k}={value}")
        for k, content in sorted(s.files.items()):
            lines.append(f"  file:  {k} -> {json.dumps(json.loads(content))}")
    return "\n".join(lines)
