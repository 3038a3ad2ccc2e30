"""run's launch timeline counts from the launcher's own start (launcher/timeline.py): interpreter
start-up included, but not what the process did before it exec'd Python (scripts/demo.sh runs
the installer first, in the same process)."""

from __future__ import annotations

import subprocess
import sys

AGE = "import time; from launcher.timeline import process_start; print(time.monotonic() - process_start())"


def test_a_process_that_waited_before_exec_is_not_charged_for_it():
    waited = subprocess.run(["sh", "-c", f'sleep 2; exec "{sys.executable}" -c "{AGE}"'],
                            capture_output=True, text=True, timeout=60)
    assert waited.returncode == 0, waited.stderr
    assert 0 < float(waited.stdout) < 1.0  # without the bound: over 2 s
    plain = subprocess.run([sys.executable, "-c", AGE], capture_output=True, text=True, timeout=60)
    assert 0 < float(plain.stdout) < 1.0
