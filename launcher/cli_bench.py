"""`exolaunch bench` (registered on the main app)."""

from launcher.cli import app  # noqa: F401
