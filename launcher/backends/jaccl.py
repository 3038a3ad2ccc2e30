"""mlx jaccl (RDMA over Thunderbolt 5) and jaccl-ring backends.

jaccl is not built on Linux: here its configuration is generated and validated (and shown by
--dry-run); it runs on Macs. MLX_IBV_DEVICES is the rank x rank device matrix (None on the
diagonal), MLX_JACCL_COORDINATOR is rank 0's first IP at the starting port.
"""

from __future__ import annotations

import json

from launcher.topology import Topology


def configure(specs, hostfile, *, backend: str, topology: Topology | None = None, **_) -> None:
    topo = topology or Topology(path=None, links=[])
    # check_backend has ensured one slot per host, so host rows are rank rows.
    matrix = topo.rdma_matrix(hostfile)
    coordinator = f"{hostfile.hosts[0].ips[0]}:{hostfile.port}"
    devices = json.dumps(matrix)
    for s in specs:
        s.env["MLX_RANK"] = str(s.rank)
        s.env["MLX_WORLD_SIZE"] = str(len(specs))
        s.env["MLX_JACCL_COORDINATOR"] = coordinator
        if backend == "jaccl-ring":
            s.env["MLX_JACCL_RING"] = "1"
        s.files["MLX_IBV_DEVICES"] = devices
