"""exolaunch data plane: runs on every rank."""
