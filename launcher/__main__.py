"""`python -m launcher` is the `exolaunch` command (handy where the script dir is not on PATH)."""

from launcher.cli import main

main()
