"""exolaunch command line: `main()` and the order subcommands are listed in.

Each subcommand lives in a cli_*.py module that registers it on the typer app in
launcher.cli_common. User errors (ConfigError) print one line and exit 2; nothing reaches the
user as a traceback (EXOLAUNCH_DEBUG=1 shows it for bug reports).
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

# Importing a subcommand module registers its commands, in this order in --help.
from launcher import cli_run  # noqa: F401  exec, run
from launcher import cli_jobs, cli_service  # noqa: F401  ps, logs, stop; service
from launcher import cli_plan, cli_doctor, cli_pull, cli_import, cli_batch, cli_bench  # noqa: F401
from launcher import cli_top  # noqa: F401  top
from launcher.cli_common import app
from launcher.errors import ConfigError, LaunchError

# typer < 0.29 raises click's exceptions; typer >= 0.29 raises those of its own vendored click
# (typer._click), which click's classes do not catch. Both export BadParameter, a UsageError
# whose ClickException base is what every usage error (unknown option or command) derives from.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="exolaunch")
    except typer.Abort:
        rv = 130
    except ClickException as e:  # a usage error: the usage line, the error, exit 2
        e.show()
        rv = e.exit_code
    except typer.Exit as e:
        rv = e.exit_code
    except ConfigError as e:
        print(f"exolaunch: error: {e}", file=sys.stderr)
        rv = 2
    except LaunchError as e:
        print(f"exolaunch: {e}", file=sys.stderr)
        rv = e.status
    except KeyboardInterrupt:
        rv = 130
    except Exception as e:  # a bug in exolaunch: one line, the traceback only on request
        if os.environ.get("EXOLAUNCH_DEBUG"):
            traceback.print_exc()
        print(f"exolaunch: internal error: {type(e).__name__}: {e} "
              "(rerun with EXOLAUNCH_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        rv = 70
    sys.exit(rv if isinstance(rv, int) else 0)

