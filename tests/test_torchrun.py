"""Ranks started outside Lightning: torchrun's 2 CPU ranks (gloo) train the global batches one
process trains with their combined batch; ranks must share one run directory and be counted by
trainer.devices x trainer.num_nodes; resuming compares trainer.num_nodes."""

import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from helpers import SMOKE, run_script
from lethe.config import validate
from lethe.errors import ConfigError

# torchrun (the interpreter's own: `python -m torch.distributed.run`) starting 2 ranks on this machine, on a free port
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# 4 optimizer steps of mamba-tiny at seq_len 64, validated (and checkpointed) once at the end
TINY = [*SMOKE, "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
        "scheduler.warmup_steps=1", "test_after_training=false"]
# Final weights of the 2-rank run against the 1-process run, elementwise. Both take the same 4 Adam
# steps over the same 8 blocks a step: DDP averages the two ranks' mean-loss gradients, which is the
# mean over the 8 blocks (every block has seq_len scored tokens), so the runs differ only in the
# order float32 sums are taken (~1e-7 relative). Adam divides by sqrt(v), which enlarges that for
# entries whose gradient is near zero: measured 2.8e-6 at most, against steps of up to lr = 3e-3 per
# entry (~9e-3 over the run). A batch in another order or on the wrong rank changes entries by a
# good part of a step, orders of magnitude above this tolerance.
WEIGHTS_ATOL = 2e-5


def torchrun_train(*overrides, **kwargs):
    return run_script("train.py", *overrides, launcher=TORCHRUN, timeout=300, **kwargs)


def load(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def initial_weights(checkpoint) -> dict:
    """The weights the run started from: its model, built under its seed (train() seeds, then builds)."""
    from lethe.training.checkpoint import build_model

    torch.manual_seed(checkpoint["lethe"]["run_config"]["seed"])
    return {f"model.{k}": v for k, v in build_model(checkpoint["lethe"]).state_dict().items()}


@pytest.mark.slow
def test_torchrun_ranks_train_the_global_batches_of_one_process(tmp_path, data_dir):
    data = f"paths.data_dir={data_dir}"
    run_script("train.py", *TINY, data, f"hydra.run.dir={tmp_path / 'one'}", "data.batch_size=8", timeout=300)
    two = torchrun_train(*TINY, data, f"hydra.run.dir={tmp_path / 'two'}", "trainer=ddp", "data.batch_size=4")
    # Lightning took torchrun's two ranks (TorchElasticEnvironment) and spawned none of its own
    members = set(re.findall(r"GLOBAL_RANK: (\d+), MEMBER: (\d+/\d+)", two.stderr + two.stdout))
    assert members == {("0", "1/2"), ("1", "2/2")}, two.stderr[-3000:]

    single, ranks = load(tmp_path / "one" / "checkpoints" / "last.ckpt"), load(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert single["global_step"] == ranks["global_step"] == 4
    # the data position: 4 steps of 8 blocks, whether 1 x 8 or 2 x 4 (the ranks' positions interleave)
    assert single["LMDataModule"] == ranks["LMDataModule"] == {"samples_seen": 4 * 8}
    assert ranks["lethe"]["run_config"]["trainer"]["devices"] == 2 and ranks["lethe"]["run_config"]["data"]["batch_size"] == 4
    a, b = single["state_dict"], ranks["state_dict"]
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest weight difference, 1 process vs 2 torchrun ranks: {worst:.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=WEIGHTS_ATOL, msg=lambda m, k=k: f"{k}: {m}")
    # and the runs trained: every tensor moved far more than the tolerance
    start = initial_weights(single)
    assert all((a[k] - start[k]).abs().max() > 100 * WEIGHTS_ATOL for k in a)


@pytest.mark.slow
def test_torchrun_ranks_with_different_run_directories_stop_in_one_line(tmp_path, data_dir):
    # each rank names its own directory (Hydra resolves the override in each process), as ranks
    # left to Hydra's default <time>_<model> directory do when they start in different seconds
    logs = tmp_path / "torchrun-logs"  # each rank's stdout and stderr in files of its own (torchrun --redirects)
    proc = run_script("train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}/rank-${{oc.env:RANK}}",
                      "trainer=ddp", launcher=(*TORCHRUN, "--log-dir", str(logs), "--redirects", "3"), timeout=300, check=False)
    stderrs = [p.read_text() for p in sorted(logs.rglob("stderr.log"), key=lambda p: p.parent.name)]  # by local rank
    assert proc.returncode != 0 and len(stderrs) == 2, proc.stderr[-3000:]
    errors = []
    for text in stderrs:  # every rank stops with one error line, no traceback
        lines = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
        errors += lines
    assert errors[0] == errors[1] and "2 ranks of this run have 2 different run directories" in errors[0], errors
    assert f"rank 0: {(tmp_path / 'rank-0').resolve()}, rank 1: {(tmp_path / 'rank-1').resolve()}" in errors[0]
    assert "pass the same hydra.run.dir=<dir> to every rank" in errors[0]
    assert not list(tmp_path.glob("rank-*"))  # refused before training: no run directory is left


def test_run_dir_disagreement_names_rank_0s_and_the_first_other():
    from lethe.training.cluster import run_dir_disagreement

    assert run_dir_disagreement(["/a"] * 4) is None
    assert run_dir_disagreement(["/a", "/a", "/b", "/c"]) == ("the 4 ranks of this run have 3 different run directories "
                                                              "(rank 0: /a, rank 2: /b)")


@pytest.mark.parametrize("world,per_node,overrides,ok", [
    (2, 2, ["trainer=ddp"], True),  # torchrun --nproc_per_node 2, trainer.devices=2
    (4, 2, ["trainer=ddp", "trainer.num_nodes=2"], True),  # --nnodes 2 --nproc_per_node 2
    (4, 2, ["trainer=ddp"], False),
    (2, 2, [], False),  # trainer=cpu: one device, each rank would train alone
    (2, 2, ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"], False),  # the right product, per node wrong
    (1, 1, [], True),
])
def test_torchrun_world_must_be_devices_times_nodes(monkeypatch, compose_train, world, per_node, overrides, ok):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    cfg = compose_train(*overrides)
    if ok:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    message = str(exc.value)
    assert "\n" not in message and f"but torchrun started {world} ({world // per_node} node(s) x {per_node})" in message
    assert "trainer.devices to --nproc_per_node and trainer.num_nodes to --nnodes" in message


def test_trainer_num_nodes_is_checked(compose_train):
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=0 is out of range"):
        validate(compose_train("trainer.num_nodes=0"))


def test_resume_compares_num_nodes_and_reads_older_checkpoints_as_one_node(compose_train):
    from lethe.data.tokenizer import byte_tokenizer
    from lethe.training.checkpoint import tokenizer_files
    from lethe.training.resume import check_same_run

    cfg = compose_train("trainer=ddp")
    tokenizer = byte_tokenizer()
    datamodule = SimpleNamespace(fingerprint="corpus-fp", tokenizer=tokenizer)

    def checkpoint(**trainer):
        run_config = OmegaConf.to_container(cfg, resolve=False)
        run_config.pop("hydra", None)
        run_config["trainer"].update(trainer)
        run_config["trainer"] = {k: v for k, v in run_config["trainer"].items() if v is not None}
        return {"lethe": {"run_config": run_config, "corpus_fingerprint": "corpus-fp", "tokenizer_files": tokenizer_files(tokenizer)}}

    assert cfg.trainer.num_nodes == 1
    check_same_run("x.ckpt", checkpoint(), cfg, datamodule)
    check_same_run("x.ckpt", checkpoint(num_nodes=None), cfg, datamodule)  # written before the key existed: one node
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2 -> 1"):
        check_same_run("x.ckpt", checkpoint(num_nodes=2), cfg, datamodule)
