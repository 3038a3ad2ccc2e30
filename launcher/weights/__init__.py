"""Model weights onto every host: `exolaunch pull`, and `stage()` for whoever needs a copy.

Two ways to get a model's files where its ranks run:

  hub    (`pull REPO`; hub.py) every host fetches what its ranks need from the Hugging Face
         Hub itself, after checking its free disk against the files' sizes.
  stage  (`pull --stage`, local directories, demo models; staging.py) the model is resolved here
         once and copied to each host over SSH, all hosts in parallel, skipping what is already
         there (same size and sha256) and resuming partial files.

files.py says which files each host's ranks need and where a copy goes; hostside.py holds the
code that also runs on the hosts (hashes, free space, what a destination holds); report.py the
per-host results; progress.py the per-host bars. Every snippet runs through launcher.remote.
"""

from launcher.weights.files import files_for_ranks, layer_range, list_model_files
from launcher.weights.hub import hub_error, hub_pull
from launcher.weights.progress import Progress
from launcher.weights.report import HostPull, PullReport, human
from launcher.weights.staging import destination, rsync_argv, stage

__all__ = ["HostPull", "Progress", "PullReport", "destination", "files_for_ranks", "human", "hub_error",
           "hub_pull", "layer_range", "list_model_files", "rsync_argv", "stage"]
