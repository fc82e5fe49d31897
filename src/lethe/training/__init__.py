"""Training: the LightningModule, schedule, callbacks, checkpoints and the run driver."""

from lethe.training.checkpoint import AtomicCheckpointIO, load_trained_model, read_checkpoint
from lethe.training.module import LanguageModelTask
from lethe.training.schedule import warmup_cosine

__all__ = ["AtomicCheckpointIO", "LanguageModelTask", "load_trained_model", "read_checkpoint", "warmup_cosine"]
