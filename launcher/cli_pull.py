"""`exolaunch pull` (registered on the main typer app when launcher.cli is imported)."""

from launcher.cli import app  # noqa: F401
