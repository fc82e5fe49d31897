"""train.py and eval.py end to end: real runs on a small slice of the embedded corpus."""

import json
import math

import pytest
import torch
import yaml

from helpers import SMALL_DATA, SMOKE, logged, offline_wandb_env, options, read_wandb_run, run_script, train_losses
from helpers import train_smoke as train
from lethe.config import validate
from lethe.errors import ConfigError
from lethe.training.schedule import warmup_cosine_factor


@pytest.mark.slow
# ---- discoverability and config errors ---------------------------------------------------
def test_help_lists_groups_and_cfg_job_prints_config():
    out = run_script("train.py", "--help").stdout
    for group in ("model", "data", "tokenizer", "optim", "scheduler", "trainer", "logger", "callbacks", "experiment"):
        assert f"{group}:" in out, group
    assert "mamba-130m" in out and "transformer-1.3b" in out and "ddp" in out
    job = run_script("train.py", "--cfg", "job", "model=transformer-tiny").stdout
    assert "_target_: lethe.models.TransformerLM" in job and "seq_len: 256" in job


@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [
    ("model.not_a_key=1", "Key 'not_a_key' is not in struct"),
    ("model=mamba-huge", "Could not find 'model/mamba-huge'"),
])
def test_unknown_keys_and_options_fail_with_hydras_message(override, expected):
    proc = run_script("train.py", override, "--cfg", "job", check=False)
    assert proc.returncode != 0 and expected in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    ("seq_len=0", "seq_len"),
    ("model.d_state=0", "model.d_state"),
    ("optim.lr=-1", "optim.lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
    ("trainer.max_steps=15", "trainer.max_steps"),  # the last 5 steps would never be validated or saved
    ("trainer.val_check_interval=0.5", "trainer.val_check_interval"),
    ("trainer.accumulate_grad_batches=3", "trainer.val_check_interval"),  # checkpoints mid-accumulation
    ("optim.betas=[0.9,1.0]", "optim.betas"),  # else a traceback from inside AdamW; more cases below, in-process
])
def test_out_of_range_values_fail_in_one_line(tmp_path, data_dir, override, key):
    proc = train(tmp_path / "run", data_dir, override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and key in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# validate() is what train.py runs first (the test above shows its error reaching the user as one line)
@pytest.mark.parametrize("override,key", [
    ("optim.eps=0", "optim.eps"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.betas=[-0.1,0.95]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,0.95,0.99]", "optim.betas"),
    ("optim.betas=0.9", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("scheduler.warmup_steps=-1", "scheduler.warmup_steps"),
    ("scheduler.min_lr=-1e-5", "scheduler.min_lr"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
    ("trainer.limit_val_batches=0", "trainer.limit_val_batches"),  # no validation would mean no checkpoint
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches"),
    ("trainer.limit_test_batches=-1", "trainer.limit_test_batches"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
])
def test_config_checks_name_the_key_and_its_valid_range(override, key, compose_train):
    with pytest.raises(ConfigError) as exc:
        validate(compose_train(*SMOKE, override))
    message = str(exc.value)
    assert message.startswith(f"{key}=") and " is out of range: expected " in message and "\n" not in message, message


@pytest.mark.parametrize("overrides", [
    [],  # the defaults, and every preset as shipped
    *[[f"experiment={name}"] for name in options("experiment")],
    # the edges of the valid ranges
    [*SMOKE, "optim.betas=[0.0,0.999]", "optim.eps=1e-12", "trainer.limit_val_batches=1", "trainer.limit_test_batches=0"],
    [*SMOKE, "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=0.5", "optim.weight_decay=0", "scheduler.min_lr=0"],
])
def test_valid_configs_pass_the_checks(overrides, compose_train):
    validate(compose_train(*overrides))


@pytest.mark.slow
def test_sequence_longer_than_transformer_allows(tmp_path, data_dir):
    proc = train(tmp_path / "run", data_dir, "model=transformer-tiny", "model.max_seq_len=32", check=False)
    assert proc.returncode == 2 and "model.max_seq_len=32" in proc.stderr and "Traceback" not in proc.stderr


# ---- a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = train(run_dir, data_dir, "trainer.max_steps=80", "trainer.val_check_interval=40", "trainer.limit_val_batches=8",
                 "seq_len=128", "data.batch_size=8", "trainer.log_every_n_steps=1")  # every step: the warmup shows
    return run_dir, proc


@pytest.mark.slow
def test_training_run_learns_and_writes_everything(trained_run):
    run_dir, proc = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    uniform = torch.log(torch.tensor(257.0)).item()  # byte tokenizer: 256 bytes + end-of-text
    assert metrics["val_loss"] < 0.6 * uniform, metrics  # well below the untrained model's loss
    assert metrics["test_loss"] < 0.6 * uniform
    assert abs(metrics["test_ppl"] - torch.exp(torch.tensor(metrics["test_loss"])).item()) < 1e-3 * metrics["test_ppl"]
    assert metrics["steps"] == 80 and metrics["tokens_seen"] == 80 * 8 * 128
    assert metrics["num_params"] > 0 and metrics["corpus_fingerprint"]
    assert 0 < metrics["train_time_s"] < metrics["wall_time_s"]  # not re-counted by the final validate/test
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert metrics["checkpoints"]["last"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert "val loss" in proc.stdout and "perplexity" in proc.stdout and "metrics.json" in proc.stdout
    losses = train_losses(run_dir)
    assert losses[max(losses)] < losses[min(losses)] - 1.0  # the loss curve falls


@pytest.mark.slow
def test_training_run_logs_every_metric(trained_run):
    # the fixture: 80 steps of 8 x 128 tokens, logged every step (a row's step is 0-based), warmup 2,
    # validation every 40 steps on 8 batches of 8 x 128 tokens (experiment=smoke)
    run_dir, _ = trained_run
    steps, peak, floor = list(range(80)), 3e-3, 1e-5
    loss, ppl = logged(run_dir, "train/loss"), logged(run_dir, "train/ppl")
    assert sorted(loss) == steps and sorted(ppl) == steps
    assert all(ppl[s] == pytest.approx(math.exp(loss[s]), rel=1e-5) for s in steps)
    lr = logged(run_dir, "train/lr")  # the rate each optimizer step ran at
    assert lr[0] == pytest.approx(peak / 2) and lr[1] == pytest.approx(peak)  # linear warmup over 2 steps
    assert all(lr[s] == pytest.approx(peak * warmup_cosine_factor(s, 2, 80, floor / peak), rel=1e-5) for s in steps)
    assert lr[79] < 2 * floor  # the cosine ends at the floor
    grad_norm = logged(run_dir, "train/grad_norm")
    assert sorted(grad_norm) == steps and all(math.isfinite(g) and g > 0 for g in grad_norm.values())
    assert all(v > 0 for v in logged(run_dir, "train/tokens_per_s").values())
    tokens = logged(run_dir, "train/tokens_seen")
    assert tokens == {s: (s + 1) * 8 * 128 for s in steps}  # steps x batch x seq_len (no accumulation)
    elapsed = [logged(run_dir, "train/elapsed_s")[s] for s in steps]
    assert 0 < elapsed[0] and all(a < b for a, b in zip(elapsed, elapsed[1:]))
    # on CPU: the process's peak resident memory in MB (torch alone is far above 10), which never falls
    memory = [logged(run_dir, "train/peak_mem_mb")[s] for s in steps]
    assert memory[0] > 10 and all(a <= b for a, b in zip(memory, memory[1:]))

    val_loss, val_ppl = logged(run_dir, "val/loss"), logged(run_dir, "val/ppl")
    assert sorted(val_loss) == sorted(val_ppl) == [39, 79]  # after steps 40 and 80; the final re-scoring is not logged
    assert all(val_ppl[s] == pytest.approx(math.exp(val_loss[s]), rel=1e-5) for s in val_loss)
    assert set(logged(run_dir, "val/tokens").values()) == {8 * 8 * 128}
    assert all(0 < acc < 1 for acc in logged(run_dir, "val/acc").values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(min(val_loss.values()), rel=1e-6)  # the best checkpoint, re-scored
    (test_loss,), (test_ppl,) = logged(run_dir, "test/loss").values(), logged(run_dir, "test/ppl").values()
    assert test_loss == pytest.approx(metrics["test_loss"], rel=1e-6) and test_ppl == pytest.approx(math.exp(test_loss), rel=1e-5)


@pytest.mark.slow
def test_eval_scores_checkpoint_like_training_did(trained_run, data_dir):
    run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the run scored the first 4 test batches of 8 blocks of 128 tokens (experiment=smoke): score the same blocks
    out, logs = run_dir.parent / "eval", f"paths.log_dir={run_dir.parent / 'logs'}"  # Hydra's eval.log: not in the repo
    run_script("eval.py", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", f"paths.data_dir={data_dir}", f"out_dir={out}",
               "splits=[test]", "lengths=[]", "max_tokens=4096", logs)
    (scores,) = [row["test"] for row in json.loads((out / "eval.json").read_text())]
    assert scores["tokens"] == metrics["test_tokens"]
    assert abs(scores["loss"] - metrics["test_loss"]) < 1e-4 and abs(scores["ppl"] - metrics["test_ppl"]) < 1e-3 * scores["ppl"]
    table = run_script("eval.py", f"sweep={run_dir}", f"out_dir={out}", logs).stdout
    assert "| run |" in table and f"{metrics['test_ppl']:.3f}" in table


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(tmp_path, data_dir):
    mid = ["+callbacks.mid._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.mid.dirpath={tmp_path / 'mid'}",
           "+callbacks.mid.every_n_train_steps=10", "+callbacks.mid.save_top_k=-1", "+callbacks.mid.filename='step{step}'",
           "+callbacks.mid.auto_insert_metric_name=false",
           "trainer.log_every_n_steps=1", "test_after_training=false"]
    train(tmp_path / "full", data_dir, *mid)
    ckpt = tmp_path / "mid" / "step10.ckpt"
    assert ckpt.is_file()
    train(tmp_path / "resumed", data_dir, *mid, f"ckpt_path={ckpt}")
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    later = sorted(s for s in full if s >= 10)
    assert later and sorted(resumed) == later
    for step in later:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step
    # resuming into a different architecture is refused in one line, before any training
    proc = train(tmp_path / "wrong", data_dir, *mid, "model=transformer-tiny", f"ckpt_path={ckpt}", check=False)
    assert proc.returncode == 2 and "differs from the configured model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_dir(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    # the default logger (wandb, offline, plus CSV): each job must start its own wandb run, not log into the last one's
    run_script("train.py", "-m", "experiment=smoke", *SMALL_DATA, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}",
               "optim.lr=1e-3,3e-3", "model=mamba-tiny,transformer-tiny", "trainer.max_steps=4",
               "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "scheduler.warmup_steps=1",
               env_extra=offline_wandb_env(tmp_path))
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    jobs = set()
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        model, lr = cfg["model"]["_target_"], cfg["optim"]["lr"]
        jobs.add((model, lr))
        assert json.loads((run / "metrics.json").read_text())["model"] == model.rsplit(".", 1)[1]
        assert cfg["paths"]["output_dir"] == cfg["logger"]["wandb"]["save_dir"] == cfg["logger"]["csv"]["save_dir"] == str(run)
        assert logged(run, "train/lr")[1] == pytest.approx(lr, rel=1e-6)  # the rate it trained at (warmup 1: the peak)
        (offline,) = (run / "wandb").glob("offline-run-*")
        recorded = read_wandb_run(offline)["config"]
        assert (recorded["model"]["_target_"], recorded["optim"]["lr"]) == (model, lr), offline
    assert jobs == {(f"lethe.models.{m}", lr) for m in ("MambaLM", "TransformerLM") for lr in (1e-3, 3e-3)}


@pytest.mark.slow
def test_a_failing_multirun_job_does_not_stop_the_sweep(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", "seq_len=0,32",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                      "scheduler.warmup_steps=1", check=False)
    assert "error: seq_len=0 is out of range" in proc.stderr
    assert proc.returncode == 3 and "1 of 2 sweep jobs failed" in proc.stderr  # after both ran
    assert len(list(sweep.rglob("metrics.json"))) == 1
    (failed,) = [json.loads(p.read_text()) for p in sweep.rglob("failed.json")]
    assert "seq_len=0" in failed["overrides"] and failed["error"].startswith("seq_len=0 is out of range")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = train(run_dir, data_dir, "trainer=ddp", "logger=none", "trainer.max_steps=6", "trainer.val_check_interval=3",
                 "trainer.limit_val_batches=2", "scheduler.warmup_steps=1", timeout=300)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 4 * 64 * 2, metrics
    assert "test_loss" in metrics, proc.stdout[-2000:]


@pytest.mark.slow
def test_default_logger_writes_an_offline_wandb_run(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # no logger override and no WANDB_* variable: offline is the config's own default
    proc = run_script("train.py", "experiment=smoke", *SMALL_DATA, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                      "trainer.max_steps=4", "trainer.val_check_interval=2", "scheduler.warmup_steps=1",
                      env_extra=offline_wandb_env(tmp_path))
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), list((run_dir / "wandb").iterdir())
    assert not list((run_dir / "wandb").glob("run-*"))  # what an online run would have made
    assert f"wandb sync {offline[0]}" in proc.stdout
    # the whole resolved config is logged into the run, as saved beside it
    run = read_wandb_run(offline[0])
    recorded = run["config"]
    assert recorded == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run["state"] == "finished" and run["project"] == "lethe" and run["summary"]["val/loss"] > 0
    assert recorded["logger"]["wandb"]["offline"] is True and recorded["optim"]["lr"] == 3e-3
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the CSV copy rides along


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps_and_every_micro_batch(tmp_path, data_dir):
    # 4 optimizer steps of 2 micro-batches of 4 x 64 tokens (experiment=smoke), validated every 2 steps;
    # tests/test_training_parts.py shows an accumulated step equals one step on the whole batch
    run_dir = tmp_path / "run"
    train(run_dir, data_dir, "trainer.accumulate_grad_batches=2", "trainer.max_steps=4", "trainer.val_check_interval=4",
          "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1", "scheduler.warmup_steps=1", "test_after_training=false")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 8 * 4 * 64  # every one of the 8 micro-batches counted
    assert logged(run_dir, "train/tokens_seen") == {s: (s + 1) * 2 * 4 * 64 for s in range(4)}  # one row per optimizer step
    # the schedule advances once per optimizer step, not per micro-batch
    lr = logged(run_dir, "train/lr")
    assert lr == pytest.approx({s: 3e-3 * warmup_cosine_factor(s, 1, 4, 1e-5 / 3e-3) for s in range(4)}, rel=1e-6)
    assert sorted(logged(run_dir, "val/loss")) == [1, 3]  # every 4 batches = 2 optimizer steps
