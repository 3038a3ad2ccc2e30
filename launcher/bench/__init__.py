"""`exolaunch bench`: benchmark sweeps, against mlx.launch + mlx_lm.server if asked."""
