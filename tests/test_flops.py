"""Analytic FLOPs per token (lethe.models.flops) against hand counts, and the throughput monitor's
train/tflops and train/mfu."""

import csv
import logging
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lethe.models import HybridLM, Mamba2LM, MambaLM, TransformerLM
from lethe.models.flops import (
    context_length,
    format_flops,
    forward_flops,
    forward_flops_per_token,
    peak_tflops,
    training_flops_per_token,
)
from lethe.training.callbacks import ThroughputMonitor
from lethe.training.module import LanguageModelTask
from lethe.training.schedule import warmup_cosine

# every model: vocab 100 (padded to 104), d_model 32; the LM head is 2 * 32 * 104 FLOPs per token
HEAD = 2 * 32 * 104
MAMBA = {"d_state": 8}  # expand 2: d_inner 64; dt_rank ceil(32 / 16) = 2; d_conv 4
# d_inner 64, 4 heads of 16, ngroups 1: conv over x, B, C = 64 + 2 * 16 = 96 channels
MAMBA2 = {"d_state": 16, "headdim": 16}
MAMBA_LAYER = (2 * 32 * 128        # in_proj 32 -> 2 * 64
               + 2 * 64 * (2 + 8 + 8)  # x_proj 64 -> dt_rank + B + C
               + 2 * 2 * 64        # dt_proj 2 -> 64
               + 2 * 64 * 32       # out_proj
               + 2 * 4 * 64        # conv: 4 taps x 64 channels, a multiply-add each
               + 9 * 64 * 8)       # scan: 9 per (d_inner, d_state)
MAMBA2_LAYER = (2 * 32 * (64 + 96 + 4)  # in_proj -> z, xBC, dt (one per head)
                + 2 * 64 * 32           # out_proj
                + 2 * 4 * 96            # conv over xBC
                + 5 * 64 * 16)          # SSD recurrence: 5 per (nheads * headdim, d_state)
ATTENTION_MATMULS = 2 * 32 * 96 + 2 * 32 * 32  # qkv_proj, o_proj
MLP_64 = 2 * 32 * 128 + 2 * 64 * 32  # gate_up_proj 32 -> 2 * 64, down_proj 64 -> 32


def mamba():
    return MambaLM(vocab_size=100, d_model=32, n_layer=2, **MAMBA)


def mamba2():  # with ngroups 2 (B and C twice as wide) and an MLP in every block
    return Mamba2LM(vocab_size=100, d_model=32, n_layer=2, ngroups=2, d_intermediate=48, **MAMBA2)


def transformer():
    return TransformerLM(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=4096)


def hybrid(pattern="M*m-", window=None):
    return HybridLM(vocab_size=100, d_model=32, pattern=pattern, mamba2=MAMBA2, mamba=MAMBA,
                    attention={"n_head": 4, "window": window}, mlp={"d_ff": 64})


def test_mamba_hand_count():
    assert forward_flops_per_token(mamba(), 16) == 2 * MAMBA_LAYER + HEAD == 46592
    assert training_flops_per_token(mamba(), 16) == 3 * 46592
    # nothing selective but B: x_proj makes only B (64 -> 8), no dt_proj
    lti = MambaLM(vocab_size=100, d_model=32, n_layer=1, d_state=8, selective={"delta": False, "C": False})
    assert forward_flops_per_token(lti, 16) == 2 * 32 * 128 + 2 * 64 * 8 + 2 * 64 * 32 + 2 * 4 * 64 + 9 * 64 * 8 + HEAD


def test_mamba2_hand_count():
    layer = (2 * 32 * (64 + (64 + 2 * 2 * 16) + 4)  # in_proj; ngroups 2: B and C of 2 * 16 each
             + 2 * 64 * 32                         # out_proj
             + 2 * 4 * (64 + 2 * 2 * 16)           # conv over xBC
             + 5 * 64 * 16                         # SSD
             + 2 * 32 * 96 + 2 * 48 * 32)          # SwiGLU MLP, d_ff 48
    assert forward_flops_per_token(mamba2(), 16) == 2 * layer + HEAD == 70656


def test_transformer_hand_count():
    # causal: the query at position i sees i keys, (16 + 1) / 2 = 8.5 on average; QK^T and AV are
    # 2 * 32 FLOPs per key each
    layer = ATTENTION_MATMULS + MLP_64 + 2 * 2 * 32 * 8.5
    assert forward_flops_per_token(transformer(), 16) == 2 * layer + HEAD == 49792


def test_hybrid_hand_count():
    attention = ATTENTION_MATMULS + 2 * 2 * 32 * 8.5  # a hybrid's * layer has no MLP of its own
    assert forward_flops_per_token(hybrid(), 16) == MAMBA2_LAYER + attention + MAMBA_LAYER + MLP_64 + HEAD == 68672


def test_sliding_window_hand_count():
    # window 4 at length 16: queries see 1, 2, 3, 4, then 4 keys for the other 12: 58 / 16 on average
    assert context_length(16, 4) == (1 + 2 + 3 + 4 + 12 * 4) / 16
    attention = ATTENTION_MATMULS + 2 * 2 * 32 * 58 / 16
    assert forward_flops_per_token(hybrid("m*", window=4), 16) == MAMBA_LAYER + attention + HEAD


@pytest.mark.parametrize("build", [mamba, mamba2, transformer, hybrid, partial(hybrid, "m*-M*", 8)])
def test_matmuls_are_twice_the_linear_weights(build):
    model = build()
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # lm_head included
    assert forward_flops(model, 32)["matmul"] == 2 * linear_weights


def test_attention_grows_linearly_with_length_and_a_window_caps_it():
    def attention(model, seq_len):
        return forward_flops(model, seq_len)["attention"]

    full = transformer()
    lengths = [256, 512, 768, 1024]
    steps = [attention(full, b) - attention(full, a) for a, b in zip(lengths, lengths[1:])]
    assert steps == [2 * 2 * 2 * 32 * 256 / 2] * 3  # 2 layers x QK^T, AV x 2 * d_model x 128 more keys each
    windowed = hybrid("m*", window=64)
    assert attention(windowed, 64) == attention(hybrid("m*"), 64)  # a window as long as the sequence: no cap
    assert attention(windowed, 128) < attention(windowed, 4096) < 4 * 32 * 64  # tends to, never exceeds, 64 keys
    # the Mamba families have no length term
    assert forward_flops(mamba(), 16) == forward_flops(mamba(), 4096)
    assert forward_flops(mamba2(), 16) == forward_flops(mamba2(), 4096)


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert peak_tflops("NVIDIA A10G") == 70.0 and peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA L40S") == 362.1
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert peak_tflops("Tesla V100-SXM2-16GB") == 125.0 and peak_tflops("Tesla V100-PCIE-32GB") == 112.0
    assert peak_tflops("NVIDIA RTX A4000") is None  # not an A40


def test_format_flops():
    assert format_flops(3.12e6) == "3.1 MFLOP" and format_flops(7.9e8) == "790.0 MFLOP" and format_flops(2.5e9) == "2.5 GFLOP"


def test_peak_of_the_job(monkeypatch, caplog):
    def job_peak(monitor, device, world_size=8):
        monitor.on_train_start(SimpleNamespace(world_size=world_size, is_global_zero=True), SimpleNamespace(device=device))
        return monitor._job_peak_tflops

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert job_peak(ThroughputMonitor(), cuda) == 8 * 989.4
    assert job_peak(ThroughputMonitor(peak_tflops=100.0), cuda) == 800.0  # the override wins
    assert job_peak(ThroughputMonitor(), torch.device("cpu")) is None  # no table for CPUs
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery GPU")
    with caplog.at_level(logging.WARNING, logger="lethe.training.callbacks"):
        assert job_peak(ThroughputMonitor(), cuda) is None
    assert "no train/mfu" in caplog.text and "NVIDIA Mystery GPU" in caplog.text and "peak_tflops" in caplog.text


def test_monitor_logs_tflops_and_mfu_of_a_training_run(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(vocab_size=64, d_model=32, n_layer=2, d_state=8, scan_impl="chunked")
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-3),
                             scheduler=partial(warmup_cosine, warmup_steps=1, min_lr=1e-4))
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens.split(2)]
    monitor = ThroughputMonitor(peak_tflops=0.5)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, log_every_n_steps=1, limit_val_batches=0,
                        logger=CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    flops = training_flops_per_token(model, 16)
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tflops")]
    assert len(rows) == 4
    for row in rows:
        tflops, tokens_per_s = float(row["train/tflops"]), float(row["train/tokens_per_s"])
        assert tflops == pytest.approx(tokens_per_s * flops / 1e12, rel=1e-6)
        assert float(row["train/mfu"]) == pytest.approx(tflops / 0.5, rel=1e-6)
    summary = monitor.summary
    # both rounded: tokens/s to a whole number, TFLOP/s to 4 significant digits
    rel = 1e-3 + 1 / summary["train_tokens_per_s"]
    assert summary["train_tflops"] == pytest.approx(summary["train_tokens_per_s"] * flops / 1e12, rel=rel)


@pytest.mark.gpu
def test_mfu_on_a_gpu_is_a_fraction_of_the_devices_peak(tmp_path):
    """On CUDA the peak comes from the device's name (no override): train/mfu is logged, in (0, 1)."""
    torch.manual_seed(0)
    model = MambaLM(vocab_size=512, d_model=256, n_layer=4, d_state=16)
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-3),
                             scheduler=partial(warmup_cosine, warmup_steps=1, min_lr=1e-4))
    tokens = torch.randint(0, 512, (64, 513), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens.split(8)]
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=8, log_every_n_steps=1,
                        limit_val_batches=0, logger=CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ThroughputMonitor()])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    with open(tmp_path / "metrics.csv") as f:
        mfus = [float(r["train/mfu"]) for r in csv.DictReader(f) if r.get("train/mfu")]
    assert len(mfus) == 8 and all(0 < m < 1 for m in mfus), mfus
