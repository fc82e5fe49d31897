"""How a sweep ends: a multirun whose jobs failed exits non-zero, after every job ran and wrote
its result (a failed job's failed.json, a finished one's metrics.json), so a script or CI notices.
Registered as a Hydra callback in conf/hydra/default.yaml."""

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from lethe.cli import EXIT_FAILED_JOBS, print_error
from lethe.report import run_files


class FailedJobsExitNonZero(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = [p.parent.name for p in run_files(sweep_dir, "failed.json")]
        finished = run_files(sweep_dir, "metrics.json")
        if failed:
            print_error(f"{len(failed)} of {len(failed) + len(finished)} sweep jobs failed ({', '.join(failed[:5])}"
                        f"{' ...' if len(failed) > 5 else ''}); each failed.json says why, and "
                        f"`python eval.py sweep={sweep_dir}` tables every job")
            sys.exit(EXIT_FAILED_JOBS)
