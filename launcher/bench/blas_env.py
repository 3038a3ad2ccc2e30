"""The BLAS of both servers in a bench point (issue 15).

Our ranks get `exolaunch run --blas MODE`, which the agent resolves on each host with
launcher/blas.py. The anchor's ranks (mlx_lm.server under mpirun or mlx.launch) must get the
same library and thread count, or a comparison measures the BLAS instead of the launchers:
`host_env` computes their variables with that same module, on the rank's own host (the
library's path is the host's business), for the ranks that share it.

What each server actually ran is read back from its rank processes (probes.py: which BLAS
library is mapped and wins symbol lookup), not assumed from the mode.
"""

from __future__ import annotations

import inspect
import os

from launcher import blas
from launcher.errors import LaunchError
from runtime.contract import ENV_BLAS, ENV_LOCAL_WORLD_SIZE

INHERITED = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")  # what a rank would inherit and rank_env respects

# launcher/blas.py run on a remote host by a standard-library snippet (launcher.remote): its one
# import, runtime.contract, is stood in for by the two names it uses.
_REMOTE = r"""
import os, sys, types
contract = types.ModuleType("runtime.contract")
contract.ENV_BLAS, contract.ENV_LOCAL_WORLD_SIZE = PARAMS["names"]
sys.modules.setdefault("runtime", types.ModuleType("runtime"))
sys.modules["runtime.contract"] = contract
ns = {"__name__": "exolaunch_blas"}
exec(compile(PARAMS["source"], "launcher/blas.py", "exec"), ns)
env = dict(PARAMS["env"])
env.update({k: os.environ[k] for k in PARAMS["inherited"] if k in os.environ})
add, error = ns["rank_env"](env)
say("result", {"add": add, "error": error})
"""


def host_env(host, mode: str, local_ranks: int, sopts) -> dict[str, str]:
    """The variables `--blas mode` adds to each of `local_ranks` ranks on `host` (LD_PRELOAD,
    OPENBLAS_NUM_THREADS, OPENBLAS_CORETYPE); LaunchError saying what to install when the host lacks the library."""
    env = {ENV_BLAS: mode, ENV_LOCAL_WORLD_SIZE: str(local_ranks)}
    if host.is_local:
        add, error = blas.rank_env({**env, **{k: os.environ[k] for k in INHERITED if k in os.environ}})
    else:
        from launcher.bench import probes

        try:
            got = probes.run_probe(host, _REMOTE, {"names": [ENV_BLAS, ENV_LOCAL_WORLD_SIZE], "env": env,
                                                   "source": inspect.getsource(blas), "inherited": INHERITED},
                                   sopts, timeout=30)
        except probes.ProbeError as e:
            raise LaunchError(f"anchor: cannot resolve --blas {mode} on {host.name}: {e}") from None
        add, error = got["add"], got["error"]
    if error:
        raise LaunchError(f"anchor on {host.name}: {error}")
    return add
