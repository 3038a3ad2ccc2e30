"""exolaunch control plane: runs where the user types."""

import time as _time

IMPORTED_AT = _time.monotonic()  # the launch timeline's bound on what came before (launcher/timeline.py)
