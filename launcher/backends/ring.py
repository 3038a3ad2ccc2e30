"""mlx ring backend: every rank gets MLX_RANK and an MLX_HOSTFILE listing each rank's ip:port.

Ports are handed out from the hostfile's starting port, one per (rank, ip), so several ranks
on one host never collide. A single rank gets no hostfile (mlx.launch writes an empty one and crashes).
"""

from __future__ import annotations

import json

from launcher.errors import ConfigError


def ring_addresses(specs, start_port: int) -> list[list[str]]:
    port = start_port
    table = []
    for s in specs:
        if not s.host.ips:
            raise ConfigError(
                f"host {s.host.name}: the ring backend needs a data-plane IP. Fix: add `ips: [ADDRESS]` to it."
            )
        entry = []
        for ip in s.host.ips:
            entry.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
            port += 1
        table.append(entry)
    if port - 1 > 65535:
        raise ConfigError(f"port {start_port}: the ring needs ports up to {port - 1}, past 65535. Fix: lower `port:`.")
    return table


def configure(specs, hostfile, *, verbose: bool = False, **_) -> None:
    table = json.dumps(ring_addresses(specs, hostfile.port))
    for s in specs:
        s.env["MLX_RANK"] = str(s.rank)
        s.env["MLX_WORLD_SIZE"] = str(len(specs))
        if verbose:
            s.env["MLX_RING_VERBOSE"] = "1"
        if len(specs) > 1:
            # mlx's ring cannot form a ring of one (it connects to itself and fails); without
            # a hostfile mlx gives a one-rank group, which is what a single rank needs.
            s.files["MLX_HOSTFILE"] = table
