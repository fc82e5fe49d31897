"""Callbacks (the `callbacks` config group): checkpoints, clean stops, throughput and memory
logging, and the validation line."""

import logging
import signal
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

from lethe.models.flops import peak_tflops, training_flops_per_token
from lethe.training.cluster import REQUEUE_SIGNALS

log = logging.getLogger(__name__)

# the signals that stop a run cleanly: Ctrl-C, a scheduler's stop, SLURM's warning before its time
# limit (USR1 with sbatch --signal=USR1@<s>, USR2 from submitit): on SLURM, those two also requeue
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *REQUEUE_SIGNALS)


class BestAndLastCheckpoint(ModelCheckpoint):
    """best.ckpt by the monitored metric and last.ckpt after every validation, whatever the metric
    did. (Lightning's ModelCheckpoint rewrites last.ckpt only at a step where it also wrote a best
    one: after a plateau a crash lost everything since the last improvement.) `save_last_now`
    writes last.ckpt at any optimizer-step boundary: what a clean stop does."""

    _last_saved_step = -1

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save_last_now(trainer)

    def save_last_now(self, trainer) -> str:
        if self.save_last and self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def _save_last_checkpoint(self, trainer, monitor_candidates):
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step


class CleanStop(L.Callback):
    """SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 finish the current optimizer step, write last.ckpt and
    end fit; the run driver then writes metrics.json marked interrupted and prints the command
    that resumes, and in a SLURM job stopped by USR1/USR2 (the time-limit warning) requeues the
    job when `requeue` is on (lethe.training.cluster). A second Ctrl-C stops at once. Every rank
    stops at the same step (the flag is all-reduced), so none waits forever in a collective the
    others left."""

    def __init__(self, requeue: bool = True):
        self.requeue = requeue
        self.signal: signal.Signals | None = None  # what stopped the run, once it stopped
        self._received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        if self._received is None:
            self._received = signum
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, writing last.ckpt "
                       "(Ctrl-C again stops at once, without saving)")

    def on_train_start(self, trainer, pl_module):
        # after Lightning registered its own SIGTERM handler (it would raise before our checkpoint)
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        for signum in STOP_SIGNALS:  # restart system calls the signal interrupts (a checkpoint being written)
            signal.siginterrupt(signum, False)

    def on_train_end(self, trainer, pl_module):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: a checkpoint here would not resume exactly
        received = self._received or 0
        if trainer.world_size > 1:  # whichever rank got it, all stop here
            flag = torch.tensor(received, device=pl_module.device)
            received = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if not received:
            return
        self.signal = signal.Signals(received)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, BestAndLastCheckpoint):
            checkpoint.save_last_now(trainer)
        trainer.limit_val_batches = 0  # stop now: no validation before stopping, as Lightning would run one
        trainer.should_stop = True


class ThroughputMonitor(L.Callback):
    """Logs tokens/s, model TFLOP/s, MFU, tokens seen, elapsed time and peak memory every optimizer step.

    Tokens are counted from the batches themselves (all ranks), so the figures stay right under
    gradient accumulation, DDP and a resumed run (tokens seen continue from the checkpoint).
    train/tflops is the whole job's: tokens/s x the model's training FLOPs per token at the
    batches' length (lethe.models.flops, analytic). train/mfu divides it by the peak of all
    devices: `peak_tflops` per device (dense bf16 TFLOP/s), or on CUDA the device's from
    lethe.models.flops.PEAK_BF16_TFLOPS; without either no MFU is logged.
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self.summary = {}  # frozen at the end of fit: later validate/test restore older states
        self.tokens_seen = 0
        self._window_tokens = self._window_flops = 0
        self._window_start = None
        self._elapsed_before = 0.0
        self._run_start = None
        # this segment's training steps alone (no validation, no checkpointing): the run's throughput
        self._segment_tokens, self._segment_flops, self._step_seconds, self._step_start = 0, 0, 0.0, None
        self._flops_per_token = {}  # by sequence length
        self._job_peak_tflops = None  # all devices together

    def on_train_start(self, trainer, pl_module):
        self._run_start = self._window_start = time.perf_counter()
        peak = self.peak_tflops
        if peak is None and pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            peak = peak_tflops(name)
            if peak is None and trainer.is_global_zero:
                log.warning("no train/mfu: the bf16 peak of %s is not known; set callbacks.throughput.peak_tflops "
                            "(dense bf16 TFLOP/s per device)", name)
        self._job_peak_tflops = peak * trainer.world_size if peak else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch["input_ids"].numel() * trainer.world_size
        flops = tokens * self._training_flops(pl_module, batch["input_ids"].shape[1])
        self.tokens_seen += tokens
        self._window_tokens += tokens
        self._window_flops += flops
        self._segment_tokens += tokens
        self._segment_flops += flops
        self._step_seconds += time.perf_counter() - self._step_start
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not (step_done and trainer._logger_connector.should_update_logs):  # log_every_n_steps cadence
            return
        now = time.perf_counter()
        seconds = max(now - self._window_start, 1e-9)
        tflops = self._window_flops / seconds / 1e12
        pl_module.log("train/tokens_per_s", self._window_tokens / seconds, prog_bar=True)
        pl_module.log("train/tflops", tflops)
        if self._job_peak_tflops:
            pl_module.log("train/mfu", tflops / self._job_peak_tflops)
        pl_module.log("train/tokens_seen", float(self.tokens_seen))
        pl_module.log("train/elapsed_s", self.elapsed())
        pl_module.log("train/peak_mem_mb", peak_memory_mb(pl_module.device))
        self._window_tokens, self._window_flops, self._window_start = 0, 0, now

    def _training_flops(self, pl_module, seq_len: int) -> float:
        """Training FLOPs per token of the task's model at seq_len (computed once per length)."""
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = training_flops_per_token(pl_module.model, seq_len)
        return self._flops_per_token[seq_len]

    def on_validation_end(self, trainer, pl_module):
        # validation time is not training throughput: start a fresh window
        self._window_tokens, self._window_flops, self._window_start = 0, 0, time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        seconds = self._step_seconds
        self.summary = {"tokens_seen": self.tokens_seen, "train_time_s": round(self.elapsed(), 2),
                        "train_tokens_per_s": round(self._segment_tokens / seconds) if seconds else None,
                        "train_tflops": float(f"{self._segment_flops / seconds / 1e12:.4g}") if seconds else None}

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
