"""The LightningModule: next-token loss, perplexity, AdamW with decay groups, warmup + cosine.

The network itself (Mamba or Transformer++) is any module from `lethe.models`; this class only
says how to train and score it.
"""

import lightning as L
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from lethe.errors import LetheError
from lethe.metrics import summed_nll
from lethe.training.checkpoint import checkpoint_metadata
from lethe.training.cluster import check_same_run_dir


class NonFiniteLossError(LetheError):
    pass


class LanguageModelTask(L.LightningModule):
    def __init__(self, model, optimizer, scheduler, tokenizer_files=None, corpus_fingerprint=None, run_config=None):
        """model: nn.Module mapping (b, l) token ids to (b, l, vocab) logits.
        optimizer: partial of a torch optimizer (from the `optim` config group); its
        `weight_decay` applies to the model's decay group only.
        scheduler: partial taking (optimizer, total_steps) (from the `scheduler` group).
        tokenizer_files, corpus_fingerprint, run_config: stored in every checkpoint.
        """
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer_files = tokenizer_files
        self.corpus_fingerprint = corpus_fingerprint
        self.run_config = run_config
        self._eval_sums = {}
        # AdamW's groups are chosen now, before a strategy wraps the model: FSDP turns every
        # parameter into a 1-d shard, and param_groups tells matrices from vectors by ndim
        # (a task built only to score or test has no optimizer, and its model may have no groups)
        self._param_groups = model.param_groups(optimizer.keywords.get("weight_decay", 0.0)) if optimizer else None

    def setup(self, stage):
        # on every rank, once Lightning has the process group up (torchrun's or srun's ranks, or its own)
        if stage == "fit":
            check_same_run_dir(self.trainer.default_root_dir)

    def training_step(self, batch, batch_idx):
        nll, tokens, _ = summed_nll(self.model, batch)
        loss = nll / tokens
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss.item()} at step {self.global_step}; {self._last_good_weights()}; "
                                     "start again with a lower optim.lr or a longer scheduler.warmup_steps (a resumed run "
                                     "would keep its saved optimizer and schedule)")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _last_good_weights(self) -> str:
        checkpoint = getattr(self._trainer, "checkpoint_callback", None)
        path = getattr(checkpoint, "last_model_path", None)
        if path:
            step = getattr(checkpoint, "_last_saved_step", None)
            return f"the last good weights are in {path} (step {step}; a new run can start from them with init_from={path})"
        return "no checkpoint was written yet (one is written after every validation)"

    # ---- evaluation: token-weighted over the whole split, summed across ranks ----------------
    def _eval_step(self, stage, batch):
        nll, tokens, correct = summed_nll(self.model, batch)
        sums = self._eval_sums.setdefault(stage, torch.zeros(3, dtype=torch.float64, device=self.device))
        sums += torch.stack([nll.detach().double(), tokens.double(), correct.double()])

    def _eval_epoch_end(self, stage):
        sums = self._eval_sums.pop(stage, torch.zeros(3, dtype=torch.float64, device=self.device))
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
        if sums[1] == 0:
            return
        loss = (sums[0] / sums[1]).float()
        # Re-scoring the best checkpoint after fit must not add a false last point to the val curve.
        to_logger = (stage != "val" or self.trainer.state.fn == "fit") and bool(self.trainer.loggers)
        options = dict(rank_zero_only=True, sync_dist=False, logger=to_logger)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", **options)
        self.log(f"{stage}/ppl", torch.exp(loss), prog_bar=stage == "val", **options)
        self.log(f"{stage}/tokens", sums[1].float(), **options)
        self.log(f"{stage}/acc", (sums[2] / sums[1]).float(), **options)

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    # ---- optimization ----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[dict(group) for group in self._param_groups])
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise LetheError("trainer.max_steps must be a positive number of optimizer steps (the schedule needs it)")
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fsdp_root(self) -> FullyShardedDataParallel | None:
        """The FSDP module wrapping this one under trainer=fsdp (None otherwise): its parameters'
        gradients are shards, so norms need all of its ranks."""
        root = self.trainer.strategy.model
        return root if isinstance(root, FullyShardedDataParallel) else None

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls this before clipping: the logged norm is the raw one.
        if (root := self._fsdp_root()) is not None:  # the norm over every rank's shard (an infinite bound clips nothing)
            self.log("train/grad_norm", root.clip_grad_norm_(float("inf")))
            return
        norms = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's FSDP precision refuses norm clipping (torch's clip_grad_norm_ would see one
        # shard); the FSDP root module clips by the norm over all of them
        root = self._fsdp_root()
        if root is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoint metadata ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["lethe"] = checkpoint_metadata(
            self.model, self.tokenizer_files, corpus_fingerprint=self.corpus_fingerprint, run_config=self.run_config
        )

