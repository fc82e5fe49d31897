"""The `logger` config group's one Lethe piece: Lightning's WandbLogger, minus a warning.

Lightning passes `anonymous=None` to `wandb.init` whatever the user asks; wandb 0.31 answers any
value of that deprecated setting with a warning on every run. The setting is dropped when unset.
"""

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
