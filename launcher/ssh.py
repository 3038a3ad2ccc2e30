"""OpenSSH argv building. We run the system `ssh` so ~/.ssh/config, agents and ProxyJump work.

Nothing from a hostfile reaches a remote shell unquoted: the remote command is only
`exec '<python>' -m launcher.agent`; everything else (argv, env, cwd) goes over the channel
as JSON. The destination follows `--`, so a host value can never be read as an ssh option.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

HOST_KEY_MODES = ("yes", "accept-new", "no")


@dataclass
class SshOptions:
    connect_timeout: float = 10.0
    host_key_check: str | None = None  # None: leave it to the user's ssh config (on by default)
    control_path: str | None = None  # connection multiplexing for several ranks per host
    config: str | None = None
    options: dict | None = None


def base_argv(opts: SshOptions, port: int | None = None) -> list[str]:
    argv = ["ssh"]
    if opts.config:
        argv += ["-F", opts.config]
    argv += [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={max(1, int(opts.connect_timeout))}",
        # Notice a dead link within ~15 s even when the rank is silent.
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
    ]
    if opts.control_path is not None:
        argv += [
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={opts.control_path}",
            # The master lives only as long as the job's sessions: no ssh left behind.
            "-o", "ControlPersist=no",
        ]
    if opts.host_key_check == "no":
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    elif opts.host_key_check in ("yes", "accept-new"):
        argv += ["-o", f"StrictHostKeyChecking={opts.host_key_check}"]
    for k, v in (opts.options or {}).items():
        argv += ["-o", f"{k}={v}"]
    if port:
        argv += ["-p", str(port)]
    return argv


def remote_argv(opts: SshOptions, host, remote: list[str]) -> list[str]:
    """ssh argv that runs `remote` (an argv) on host through its login shell, safely quoted."""
    return base_argv(opts, host.port) + ["-T", "--", host.ssh, "exec " + shlex.join(remote)]


def agent_argv(opts: SshOptions, host, python: str, control_path: str | None = None) -> list[str]:
    if control_path is not None:
        opts = dataclasses.replace(opts, control_path=control_path)
    return remote_argv(opts, host, [python, "-m", "launcher.agent"])
