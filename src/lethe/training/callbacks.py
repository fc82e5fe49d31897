"""Callbacks: throughput and memory logging, and the end-of-run summary."""

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm


class ThroughputMonitor(L.Callback):
    """Logs tokens/s, tokens seen, elapsed time and peak memory every optimizer step.

    Tokens are counted from the batches themselves (all ranks), so the figures stay right under
    gradient accumulation, DDP and a resumed run (tokens seen continue from the checkpoint).
    """

    def __init__(self):
        self.summary = {}  # frozen at the end of fit: later validate/test restore older states
        self.tokens_seen = 0
        self._window_tokens = 0
        self._window_start = None
        self._elapsed_before = 0.0
        self._run_start = None

    def on_train_start(self, trainer, pl_module):
        self._run_start = self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch["input_ids"].numel() * trainer.world_size
        self.tokens_seen += tokens
        self._window_tokens += tokens
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not (step_done and trainer._logger_connector.should_update_logs):  # log_every_n_steps cadence
            return
        now = time.perf_counter()
        pl_module.log("train/tokens_per_s", self._window_tokens / max(now - self._window_start, 1e-9), prog_bar=True)
        pl_module.log("train/tokens_seen", float(self.tokens_seen))
        pl_module.log("train/elapsed_s", self.elapsed())
        pl_module.log("train/peak_mem_mb", peak_memory_mb(pl_module.device))
        self._window_tokens, self._window_start = 0, now

    def on_validation_end(self, trainer, pl_module):
        # validation time is not training throughput: start a fresh window
        self._window_tokens, self._window_start = 0, time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.summary = {"tokens_seen": self.tokens_seen, "train_time_s": round(self.elapsed(), 2)}

    def elapsed(self) -> float:
        now = time.perf_counter()
        return self._elapsed_before + (now - self._run_start if self._run_start else 0.0)

    def state_dict(self):
        return {"tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict):
        self.tokens_seen = state_dict["tokens_seen"]
        self._elapsed_before = state_dict["elapsed_s"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


class ValidationPrinter(L.Callback):
    """Prints validation perplexity as a plain line (it survives the progress bar and log files)."""

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        if "val/loss" in metrics:
            # tqdm.write: on a line of its own above the open progress bars, not glued to one
            tqdm.write(f"[step {trainer.global_step:>6}] val loss {metrics['val/loss']:.4f}  ppl {metrics['val/ppl']:.3f}")
