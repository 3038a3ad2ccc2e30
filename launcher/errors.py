"""User-facing errors.

A ConfigError carries a message that already names the file, line or field and says
what to do; the CLI prints it as-is (no traceback) and exits with status 2.
"""


class ConfigError(Exception):
    """Bad input from the user: a hostfile, topology, flag or env file."""


class LaunchError(Exception):
    """The job could not be started or was torn down; carries an exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status
