"""The `logger` config group's Lethe pieces: Lightning's loggers, minus what loses or clutters.

- WandbLogger: Lightning passes `anonymous=None` to `wandb.init` whatever the user asks; wandb
  0.31 answers any value of that deprecated setting with a warning on every run. The setting is
  dropped when unset.
- CSVLogger: Lightning's CSV writer deletes an existing metrics.csv when it starts, so a run
  resumed in its own directory would lose the curve of its first segment. This one appends (the
  resume driver has already dropped the rows the resumed run redoes).
"""

import csv
import os

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])  # the file's column order


class CSVLogger(LightningCSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
