"""The training pieces on their own: schedule, atomic checkpoints, NaN guard, gradient accumulation."""

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from lethe.config import instantiate
from lethe.errors import LetheError
from lethe.metrics import summed_nll
from lethe.models import MambaLM
from lethe.training.callbacks import ThroughputMonitor
from lethe.training.checkpoint import AtomicCheckpointIO, read_checkpoint
from lethe.training.module import LanguageModelTask, NonFiniteLossError
from lethe.training.schedule import warmup_cosine


def test_schedule_warmup_then_cosine_to_floor():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = warmup_cosine(opt, total_steps=110, warmup_steps=10, min_lr=1e-4)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    # halfway through the decay the cosine is at the midpoint between peak and floor
    assert lrs[60] == pytest.approx(1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_atomic_checkpoint_never_leaves_a_torn_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial bytes")  # torch.save is handed the temporary file's path
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(LetheError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(LetheError, match="corrupt"):
        read_checkpoint(tmp_path / "corrupt.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(LetheError, match="not written by lethe"):
        read_checkpoint(tmp_path / "foreign.ckpt")
    torch.save({"lethe": {"format_version": 999}}, tmp_path / "future.ckpt")
    with pytest.raises(LetheError, match="format version 999"):
        read_checkpoint(tmp_path / "future.ckpt")


class NaNModel(torch.nn.Module):
    def forward(self, ids):
        return torch.full((*ids.shape, 8), float("nan"))


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    task = LanguageModelTask(NaNModel(), optimizer=None, scheduler=None)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(NonFiniteLossError, match="at step 0; no checkpoint was written yet.*lower optim.lr"):
        task.training_step(batch, 0)
    # with a checkpoint written: its path and step, never a placeholder
    checkpoint = type("Checkpoint", (), {"last_model_path": str(tmp_path / "last.ckpt"), "_last_saved_step": 10})()
    task._trainer = type("Trainer", (), {"checkpoint_callback": checkpoint, "global_step": 12})()
    with pytest.raises(NonFiniteLossError, match=rf"at step 12; the last good weights are in {tmp_path}/last.ckpt \(step 10;"):
        task.training_step(batch, 0)


def test_summed_nll_is_the_token_sum_of_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100  # unscored positions count nowhere
    nll, tokens, correct = summed_nll(lambda ids: logits, {"input_ids": labels, "labels": labels})
    scored = [(b, t) for b in range(2) for t in range(5) if labels[b, t] != -100]
    expected = -sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in scored)
    assert tokens == 8 and nll.item() == pytest.approx(expected.item(), rel=1e-6)
    assert correct == sum(int(logits[b, t].argmax() == labels[b, t]) for b, t in scored)


def test_optimizer_groups_follow_the_models_decay_split(compose_train):
    cfg = compose_train("model=mamba-tiny")
    model = instantiate(cfg.model, vocab_size=257)
    task = LanguageModelTask(model, optimizer=instantiate(cfg.optim), scheduler=instantiate(cfg.scheduler))
    task.trainer = type("T", (), {"max_steps": 100})()  # configure_optimizers reads max_steps only
    opt = task.configure_optimizers()["optimizer"]
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert decays[id(names[next(n for n in names if n.endswith("A_log"))])] == 0.0
    assert decays[id(names[next(n for n in names if n.endswith("in_proj.weight"))])] == cfg.optim.weight_decay
    assert len(decays) == len(list(model.parameters()))


class OptimizerSteps(L.Callback):
    """The learning rate and the gradients (accumulated, before clipping) at every optimizer step."""

    def __init__(self):
        self.lrs, self.grads = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def fit_three_steps(batches, accumulate):
    """Three optimizer steps of a small Mamba over `batches`, as train.py's task, optimizer and schedule run them."""
    torch.manual_seed(0)
    model = MambaLM(vocab_size=64, d_model=32, n_layer=2, d_state=8, scan_impl="chunked")
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
                             scheduler=partial(warmup_cosine, warmup_steps=3, min_lr=1e-4))
    steps, throughput = OptimizerSteps(), ThroughputMonitor()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[steps, throughput])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer, steps, throughput, model


def test_accumulated_micro_batches_step_like_one_whole_batch():
    tokens = torch.randint(0, 64, (12, 17), generator=torch.Generator().manual_seed(0))

    def as_batches(rows):
        return [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens.split(rows)]

    acc_trainer, acc_steps, acc_tokens, acc_model = fit_three_steps(as_batches(2), accumulate=2)  # 6 micro-batches of 2
    trainer, steps, whole_tokens, model = fit_three_steps(as_batches(4), accumulate=1)  # 3 batches of 4
    assert acc_trainer.global_step == trainer.global_step == 3
    assert acc_tokens.tokens_seen == whole_tokens.tokens_seen == 12 * 16  # every micro-batch counted
    # warmup over 3 steps: a schedule stepped per micro-batch would reach the peak at the second step
    assert acc_steps.lrs == steps.lrs == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])
    for step, (accumulated, whole) in enumerate(zip(acc_steps.grads, steps.grads)):
        for name in whole:  # the mean of the two micro-batch losses is the whole batch's mean loss
            torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
    for (name, a), b in zip(acc_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
