"""Command-line typos are usage errors (the usage line, the error, exit 2), never "internal error"
(exit 70), whichever typer the pyproject allows: typer >= 0.29 raises its vendored click's
exceptions, not click's."""

from __future__ import annotations

import pytest

from tests.launch_helpers import run


@pytest.mark.parametrize("args,usage,needle", [
    (["run", "--prot", "5"], "Usage: exolaunch run", "--prot"),
    (["srun"], "Usage: exolaunch [OPTIONS] COMMAND", "No such command 'srun'"),
    (["exec", "--np", "two", "--", "true"], "Usage: exolaunch exec", "--np"),
    (["--hostfiel", "h.yaml", "run"], "Usage: exolaunch [OPTIONS] COMMAND", "--hostfiel"),
])
def test_usage_error_exits_2_with_the_usage_line(args, usage, needle):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert usage in r.stderr and needle in r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
