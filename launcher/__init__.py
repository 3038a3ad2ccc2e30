"""exolaunch control plane: runs where the user types."""
