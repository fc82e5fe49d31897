"""trainer=fsdp on the CPU (trainer=fsdp-cpu: 2 processes over gloo, fp32): it trains what one
process trains, its sharded checkpoints resume exactly, and eval.py, generate.py and export read
them like .ckpt files; sharded saves are never half-written."""

import json
from pathlib import Path

import pytest
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from helpers import assert_one_line, compose_config, logged, train_losses
from helpers import train_smoke as train
from lethe.config import instantiate
from lethe.errors import ConfigError, LetheError
from lethe.evaluation import evaluate_checkpoints
from lethe.files import replace_directory
from lethe.generation import generate
from lethe.interop.__main__ import main as interop_main
from lethe.modules import Block
from lethe.training.checkpoint import load_trained_model, model_state, read_checkpoint
from lethe.training.strategies import FSDPStrategy

# 6 steps of the tiny Mamba (4 Blocks), validated (and checkpointed) at steps 3 and 6
SHORT = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "scheduler.warmup_steps=1",
         "trainer.log_every_n_steps=1"]
SHARDED = ["trainer=fsdp-cpu", *SHORT, "trainer.strategy.state_dict_type=sharded"]
SHARD_FILES = {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}  # the index, Lightning's state, one shard per rank


def weights(ckpt) -> dict:
    return model_state(read_checkpoint(ckpt))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- end to end (first and third: under -n 2 xdist starts them on different workers) ----------
@pytest.mark.slow
def test_two_fsdp_processes_train_what_one_process_trains(tmp_path, data_dir):
    """2 ranks x 2 rows (FSDP, full state dict) against 1 process x 4 rows: the same 4 blocks per
    step (rank r takes global positions r, r + 2, ...), the same seed and initial weights."""
    common = [*SHORT, "test_after_training=false"]
    train(tmp_path / "one", data_dir, *common, "data.batch_size=4")
    train(tmp_path / "fsdp", data_dir, *common, "trainer=fsdp-cpu", "data.batch_size=2")
    one, fsdp = tmp_path / "one" / "checkpoints" / "last.ckpt", tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert fsdp.is_file() and read_checkpoint(fsdp)["global_step"] == 6
    assert read_checkpoint(fsdp)["lethe"]["num_params"] == read_checkpoint(one)["lethe"]["num_params"] == 500_352
    # fp32 with the same arithmetic but another summation order (two half-batch backward passes,
    # then a reduce-scatter) differs in the last bits of each gradient (~1e-7 relative); six
    # AdamW steps of lr 3e-3 carry that into the weights at ~1e-7..1e-6, while any real
    # difference (a lost weight decay group, a wrong clip, a rank's rows twice) moves them by
    # lr x (1e-1..1) = 3e-4..3e-3 in a single step
    difference = max_difference(weights(one), weights(fsdp))
    print(f"max |w_fsdp - w_one| after 6 steps: {difference:.2e}")
    assert difference < 2e-5
    # the logged gradient norm is the whole gradient's, not rank 0's shard
    one_norm, fsdp_norm = logged(tmp_path / "one", "train/grad_norm"), logged(tmp_path / "fsdp", "train/grad_norm")
    assert sorted(one_norm) == sorted(fsdp_norm) == list(range(6)), (one_norm, fsdp_norm)
    for step in one_norm:
        assert fsdp_norm[step] == pytest.approx(one_norm[step], rel=1e-4), step


# ---- config ---------------------------------------------------------------------------------------
def test_fsdp_cpu_builds_a_trainer_that_wraps_each_residual_block(compose_train):
    cfg = compose_train("trainer=fsdp-cpu")
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    strategy = trainer.strategy
    assert isinstance(strategy, FSDPStrategy) and trainer.num_devices == 2 and strategy.root_device.type == "cpu"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    assert compose_train("trainer=fsdp").trainer.accelerator == "gpu"  # trainer=fsdp stays the GPU one


def test_a_wrong_auto_wrap_class_is_one_line():
    with pytest.raises(ConfigError) as exc_info:
        FSDPStrategy(auto_wrap_policy=["lethe.modules.Blok"])
    assert_one_line(exc_info, "auto_wrap_policy", "lethe.modules.Blok", "lethe.modules.Block")


@pytest.mark.slow
def test_sharded_checkpoints_resume_exactly_and_the_tools_read_them(tmp_path, data_dir):
    mid = ["+callbacks.mid._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.mid.dirpath={tmp_path / 'mid'}",
           "+callbacks.mid.every_n_train_steps=3", "+callbacks.mid.save_top_k=-1", "+callbacks.mid.filename='step{step}'",
           "+callbacks.mid.auto_insert_metric_name=false"]
    full_run = tmp_path / "full"
    train(full_run, data_dir, *SHARDED, *mid)
    checkpoints = full_run / "checkpoints"
    for ckpt in (checkpoints / "last.ckpt", checkpoints / "best.ckpt", tmp_path / "mid" / "step3.ckpt"):
        assert ckpt.is_dir() and {p.name for p in ckpt.iterdir()} == SHARD_FILES, ckpt
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary directory left
    mid_checkpoint = read_checkpoint(tmp_path / "mid" / "step3.ckpt")  # meta.pt carries the `lethe` entry
    assert mid_checkpoint["global_step"] == 3 and mid_checkpoint["lethe"]["num_params"] == 500_352

    # interrupted at step 3 and resumed from its shards: the same steps 4-6 and the same weights.
    # What a crash in the middle of a sharded save leaves (a temporary directory of some shards
    # beside last.ckpt) is never read and is removed by the next save
    crashed = tmp_path / "resumed" / "checkpoints" / ".last.ckpt.crashed.tmp"
    crashed.mkdir(parents=True)
    (crashed / "__0_0.distcp").write_bytes(b"\0" * 64)
    train(tmp_path / "resumed", data_dir, *SHARDED, *mid, f"ckpt_path={tmp_path / 'mid' / 'step3.ckpt'}",
          "test_after_training=false")
    full, resumed = train_losses(full_run), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5], resumed  # steps are logged from 0: the 4th, 5th and 6th
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step
    assert sorted(p.name for p in crashed.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    difference = max_difference(weights(checkpoints / "last.ckpt"), weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    print(f"max |w_resumed - w_uninterrupted| (sharded): {difference:.2e}")
    assert difference == 0.0

    # eval.py's scoring (evaluate_checkpoints, in this process: a fresh interpreter would double
    # the test's time) finds the sharded best.ckpt (a directory) and scores it as training's own
    # test pass did
    metrics = json.loads((full_run / "metrics.json").read_text())
    cfg = compose_config(f"ckpt={checkpoints / 'best.ckpt'}", f"paths.data_dir={data_dir}", "lengths=[]", "splits=[test]",
                         config_name="eval")
    (row,), failed = evaluate_checkpoints(cfg)
    assert not failed and row["test"]["tokens"] == metrics["test_tokens"], (row, failed)
    assert abs(row["test"]["loss"] - metrics["test_loss"]) < 1e-4
    # what generate.py and export do with it (load_trained_model, in this process): sample, and
    # write a transformers directory
    model, tokenizer, _ = load_trained_model(checkpoints / "last.ckpt")
    prompt = [tokenizer.eos_token_id, *tokenizer.encode("def ", add_special_tokens=False)]
    (new,) = generate(model, [prompt], max_new_tokens=8, temperature=0)
    assert len(new) == 8 or new[-1] == tokenizer.eos_token_id
    interop_main(["export", str(checkpoints / "last.ckpt"), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file() and list(Path(tmp_path / "hf").glob("*.safetensors"))


# ---- what a sharded save leaves -----------------------------------------------------------------
def test_replace_directory_swaps_in_the_whole_new_one(tmp_path):
    target = tmp_path / "last.ckpt"
    for content in ("old", "new"):
        new = tmp_path / f".last.ckpt.{content}.tmp"
        new.mkdir()
        (new / "shard").write_text(content)
        replace_directory(new, target)
        assert (target / "shard").read_text() == content and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the old one is gone, nothing left beside
    # a full checkpoint (a file) replaced by a sharded one (a directory)
    file_target = tmp_path / "best.ckpt"
    file_target.write_bytes(b"full")
    new = tmp_path / ".best.ckpt.x.tmp"
    new.mkdir()
    (new / "meta.pt").write_text("sharded")
    replace_directory(new, file_target)
    assert (file_target / "meta.pt").read_text() == "sharded"


def test_an_incomplete_shard_directory_is_refused_in_one_line(tmp_path):
    partial = tmp_path / "last.ckpt"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 16)
    with pytest.raises(LetheError) as exc_info:
        read_checkpoint(partial)
    assert_one_line(exc_info, str(partial), "meta.pt", ".metadata", "not a sharded checkpoint")


def test_replace_directory_without_an_atomic_swap_moves_the_old_one_aside(tmp_path, monkeypatch):
    monkeypatch.setattr("lethe.files._exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    target = tmp_path / "last.ckpt"
    target.mkdir()
    (target / "shard").write_text("old")
    new = tmp_path / ".last.ckpt.x.tmp"
    new.mkdir()
    (new / "shard").write_text("new")
    replace_directory(new, target)
    assert (target / "shard").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
