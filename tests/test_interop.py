"""Hugging Face interop: Lethe checkpoints <-> transformers directories, and their use in eval/train.

Every model is tiny and randomly initialized (then perturbed, so that norms, biases and D are not
their constant inits and a swapped or transposed tensor changes the logits); logits are compared
in fp32. transformers' Mamba and Mamba-2 run their slow pure-PyTorch paths on CPU, which is fine
at this size.
"""

import inspect
import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BambaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)
from transformers.models.mamba2 import modeling_mamba2

from helpers import assert_one_line, compose_config, perturbed, run_script
from lethe.config import instantiate, validate
from lethe.data import byte_tokenizer, load_tokenizer, train_bpe
from lethe.errors import ConfigError, LetheError
from lethe.evaluation import CheckpointEvaluator
from lethe.interop import export_checkpoint, import_pretrained
from lethe.interop.__main__ import main as interop_main
from lethe.models import HybridLM, Mamba2LM, MambaLM, TransformerLM
from lethe.training.checkpoint import load_trained_model, read_checkpoint, save_model_checkpoint
from lethe.training.run import check_resumable, load_initial_weights

ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()  # 257 tokens, padded to 264 by Lethe's default multiple of 8


def tiny_mamba(**overrides):
    kw = dict(vocab_size=257, d_model=32, n_layer=2, d_state=8) | overrides
    return perturbed(MambaLM(**kw))


def tiny_transformer(**overrides):
    kw = dict(vocab_size=257, d_model=32, n_layer=2, n_head=2, d_ff=48, max_seq_len=64) | overrides
    return perturbed(TransformerLM(**kw))


def tiny_mamba2(**overrides):
    # A_init_range as model=mamba2-* writes it (a list, where the constructor's default is a tuple): what an import writes
    kw = dict(vocab_size=257, d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=16, A_init_range=[1.0, 16.0]) | overrides
    return perturbed(Mamba2LM(**kw))


def write_ckpt(model, tokenizer, path):
    save_model_checkpoint(model, tokenizer, path, source={"format": "test"})
    return path


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


def lethe_logits(model, ids):
    with torch.no_grad():
        return model(ids)


def ids(n=2, length=24, vocab=257):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def hf_mamba_dir(path, tokenizer, **overrides):
    """A randomly initialized transformers Mamba saved with save_pretrained, plus byte tokenizer files."""
    kw = dict(vocab_size=264, hidden_size=32, num_hidden_layers=2, state_size=8, time_step_rank=3) | overrides
    hf = MambaForCausalLM(MambaConfig(**kw))
    perturbed(hf)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf


# ---- export: Lethe -> transformers gives the same logits -----------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"bias": True, "conv_bias": False, "dt_rank": 3, "expand": 3, "d_conv": 3,
                                            "residual_in_fp32": False, "norm_eps": 1e-6}])
def test_exported_mamba_matches_in_transformers(tmp_path, tokenizer, overrides):
    model = tiny_mamba(**overrides)
    out = export_checkpoint(write_ckpt(model, tokenizer, tmp_path / "m.ckpt"), tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["vocab_size"] == 264 and config["eos_token_id"] == 256
    x = ids()
    expected = lethe_logits(model, x)
    for cls in (MambaForCausalLM, AutoModelForCausalLM):
        hf = cls.from_pretrained(out).eval()
        assert type(hf) is MambaForCausalLM and hf.dtype == torch.float32
        torch.testing.assert_close(hf_logits(hf, x), expected, atol=ATOL, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("def f(x):")["input_ids"] == tokenizer("def f(x):")["input_ids"]


def test_exported_transformer_matches_llama(tmp_path, tokenizer):
    model = tiny_transformer(rope_theta=500000.0, norm_eps=1e-6)
    out = export_checkpoint(write_ckpt(model, tokenizer, tmp_path / "t.ckpt"), tmp_path / "hf")
    x = ids(length=40)
    expected = lethe_logits(model, x)
    for cls in (LlamaForCausalLM, AutoModelForCausalLM):
        hf = cls.from_pretrained(out).eval()
        assert type(hf) is LlamaForCausalLM
        assert hf.config.num_key_value_heads == 2 and hf.config.intermediate_size == 48
        assert hf.config.max_position_embeddings == 64 and hf.config.tie_word_embeddings
        torch.testing.assert_close(hf_logits(hf, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("make", [tiny_mamba, tiny_transformer, tiny_mamba2], ids=["mamba", "transformer", "mamba2"])
def test_round_trip_preserves_every_tensor(tmp_path, tokenizer, make):
    model = make()
    hf_dir = export_checkpoint(write_ckpt(model, tokenizer, tmp_path / "a.ckpt"), tmp_path / "hf")
    import_pretrained(hf_dir, tmp_path / "b.ckpt")
    back, back_tokenizer, meta = load_trained_model(tmp_path / "b.ckpt")
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert meta["model_config"] == model.config  # defaults come back as written (dt_rank auto, d_ff null)
    assert meta["run_config"] is None and meta["corpus_fingerprint"] is None
    assert meta["source"]["format"] == "transformers" and meta["source"]["path"] == str(hf_dir.resolve())
    assert back_tokenizer.get_vocab() == tokenizer.get_vocab()


# ---- import: transformers -> Lethe gives the same logits -----------------------------------------
def test_imported_transformers_mamba_matches(tmp_path, tokenizer):
    hf = hf_mamba_dir(tmp_path / "hf", tokenizer, use_bias=True, residual_in_fp32=False)
    meta = import_pretrained(tmp_path / "hf", tmp_path / "m.ckpt")
    assert meta["model_config"]["dt_rank"] == 3 and meta["model_config"]["bias"] is True
    model, _, _ = load_trained_model(tmp_path / "m.ckpt")
    x = ids()
    torch.testing.assert_close(lethe_logits(model, x), hf_logits(hf.eval(), x), atol=ATOL, rtol=0)


def test_imported_published_layout_with_pytorch_model_bin(tmp_path, tokenizer):
    """The state-spaces/mamba-*-hf layout: a 4.39-era config.json (mamba_ssm's extra keys) and
    weights in pytorch_model.bin, the tied lm_head saved alongside."""
    hf = perturbed(MambaForCausalLM(MambaConfig(vocab_size=264, hidden_size=32, num_hidden_layers=2, state_size=8)))
    hf_dir = tmp_path / "mamba-hf"
    hf_dir.mkdir()
    torch.save(hf.state_dict(), hf_dir / "pytorch_model.bin")
    config = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "d_model": 32, "n_layer": 2,
              "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "expand": 2, "state_size": 8,
              "conv_kernel": 4, "time_step_rank": 2, "vocab_size": 264, "pad_vocab_size_multiple": 8,
              "fused_add_norm": True, "rms_norm": True, "residual_in_fp32": True, "use_bias": False,
              "use_conv_bias": True, "hidden_act": "silu", "layer_norm_epsilon": 1e-5, "bos_token_id": 0,
              "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float32", "transformers_version": "4.39.0.dev0"}
    (hf_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(hf_dir)
    import_pretrained(hf_dir, tmp_path / "m.ckpt")
    model, _, meta = load_trained_model(tmp_path / "m.ckpt")
    assert meta["model_config"]["dt_rank"] == "auto" and meta["model_config"]["pad_vocab_multiple"] == 8
    x = ids()
    torch.testing.assert_close(lethe_logits(model, x), hf_logits(hf.eval(), x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("vocab_size,multiple", [(264, 8), (257, 1), (300, 300)])
def test_imported_llama_matches(tmp_path, tokenizer, vocab_size, multiple):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, tie_word_embeddings=True)
    hf = perturbed(LlamaForCausalLM(config))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    import_pretrained(tmp_path / "hf", tmp_path / "t.ckpt")
    model, _, meta = load_trained_model(tmp_path / "t.ckpt")
    assert meta["model_config"]["pad_vocab_multiple"] == multiple and model.padded_vocab_size == vocab_size
    assert meta["model_config"]["rope_theta"] == 1000.0 and meta["model_config"]["d_ff"] == 40
    x = ids(length=50)
    torch.testing.assert_close(lethe_logits(model, x), hf_logits(hf.eval(), x), atol=ATOL, rtol=0)


# ---- refusals: one line naming the problem -------------------------------------------------------
def test_lti_mamba_is_not_exported(tmp_path, tokenizer):
    model = tiny_mamba(selective={"delta": False, "B": False, "C": True})
    with pytest.raises(LetheError) as exc:
        export_checkpoint(write_ckpt(model, tokenizer, tmp_path / "lti.ckpt"), tmp_path / "hf")
    assert_one_line(exc, "selectivity", "delta, B", "no equivalent")
    assert not (tmp_path / "hf" / "config.json").exists()


def test_a_hybrid_is_refused_by_name(tmp_path, tokenizer):
    model = HybridLM(vocab_size=257, d_model=32, pattern="M*", mamba2={"d_state": 8, "headdim": 16}, attention={"n_head": 2})
    with pytest.raises(LetheError) as exc:
        export_checkpoint(write_ckpt(model, tokenizer, tmp_path / "hybrid.ckpt"), tmp_path / "hf")
    assert_one_line(exc, "HybridLM (pattern M*)", "no class for a hybrid", "eval.py")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("field,value", [
    ("num_key_value_heads", 2), ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("tie_word_embeddings", False),
])
def test_unsupported_llama_features_are_refused(tmp_path, tokenizer, field, value):
    kw = dict(vocab_size=264, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
              tie_word_embeddings=True) | {field: value}
    config = LlamaConfig(**kw)
    config.save_pretrained(tmp_path / "hf")  # the config is refused before any weight is read
    tokenizer.save_pretrained(tmp_path / "hf")
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "t.ckpt")
    assert_one_line(exc, "rope_scaling" if field == "rope_parameters" else field, "not supported")
    assert not (tmp_path / "t.ckpt").exists()


def test_missing_and_incomplete_directories_are_refused(tmp_path, tokenizer):
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "nowhere", tmp_path / "x.ckpt")
    assert_one_line(exc, "nowhere", "no config.json")

    hf_mamba_dir(tmp_path / "hf", tokenizer)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    missing = dict(weights)
    del missing["backbone.layers.1.mixer.dt_proj.bias"]
    save_file(missing, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "x.ckpt")
    assert_one_line(exc, "backbone.layers.1.mixer.dt_proj.bias")

    save_file(weights | {"backbone.layers.0.mixer.extra": torch.zeros(3)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "x.ckpt")
    assert_one_line(exc, "backbone.layers.0.mixer.extra", "no place")

    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "x.ckpt")
    assert_one_line(exc, "holds no weights")

    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "x.ckpt")
    assert_one_line(exc, "no tokenizer.json", "--tokenizer")
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.slow
# ---- the command line ----------------------------------------------------------------------------
def test_cli_export_import_and_errors(tmp_path, tokenizer, capsys):
    ckpt = write_ckpt(tiny_mamba(), tokenizer, tmp_path / "m.ckpt")
    interop_main(["export", str(ckpt), str(tmp_path / "hf")])
    interop_main(["import", str(tmp_path / "hf"), str(tmp_path / "back.ckpt")])
    assert "exported" in capsys.readouterr().out and read_checkpoint(tmp_path / "back.ckpt")["lethe"]["source"]
    with pytest.raises(SystemExit) as exit_info:  # exporting over an existing model needs --force
        interop_main(["export", str(ckpt), str(tmp_path / "hf")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    interop_main(["export", "--force", str(ckpt), str(tmp_path / "hf")])
    # as a module, in a fresh interpreter: a user error is one `error:` line and exit status 2
    proc = subprocess.run([sys.executable, "-m", "lethe.interop", "import", str(tmp_path / "nowhere"), str(tmp_path / "y.ckpt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


# ---- an imported checkpoint in eval.py and train.py ----------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small local corpus: 40 paragraphs, 4 held out for val and 4 for test."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "state space model selective scan token memory forget recall sequence layer".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40))
    (root / "corpus.txt").write_text(text)
    overrides = [f"data.source.path={root / 'corpus.txt'}", "data.source.holdout.val=4", "data.source.holdout.test=4",
                 "data.num_proc=1", f"paths.data_dir={root / 'data'}"]
    return root, overrides


@pytest.mark.slow
def test_eval_scores_an_imported_checkpoint_on_named_data(tmp_path, tokenizer, corpus):
    _, data = corpus
    hf = hf_mamba_dir(tmp_path / "hf", tokenizer).eval()
    import_pretrained(tmp_path / "hf", tmp_path / "m.ckpt")
    args = [f"ckpt={tmp_path / 'm.ckpt'}", "data=local", *data, "seq_len=32", "splits=[test]", "lengths=[]", "batch_size=4",
            "max_tokens=256", f"out_dir={tmp_path / 'eval'}"]  # the first 2 batches of 4 blocks of 32 tokens
    run_script("eval.py", *args, f"paths.log_dir={tmp_path}")  # Hydra's eval.log: not in the repo
    (scores,) = [row["test"] for row in json.loads((tmp_path / "eval" / "eval.json").read_text())]

    # the same blocks scored by transformers' model: the imported checkpoint is evaluated faithfully
    cfg = compose_config(*args, config_name="eval")
    datamodule = instantiate({**OmegaConf.to_container(cfg.data, resolve=True), "eval_batch_size": 4},
                             tokenizer={"_target_": "lethe.data.tokenizer.pretrained", "name": str(tmp_path / "hf")}, seq_len=32,
                             cache_dir=cfg.paths.data_dir, _recursive_=False)
    datamodule.setup()
    nll, tokens = 0.0, 0
    for _, batch in zip(range(2), datamodule.eval_dataloader("test")):
        logits = hf_logits(hf, batch["input_ids"])
        nll += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
        tokens += batch["labels"].numel()
    assert scores["tokens"] == tokens and scores["loss"] == pytest.approx(nll / tokens, abs=2e-4)

    # without a run config and without data on the command line: one line saying what to name
    bare = compose_config(f"ckpt={tmp_path / 'm.ckpt'}", config_name="eval")
    with pytest.raises(ConfigError) as exc:
        CheckpointEvaluator(tmp_path / "m.ckpt", bare)
    assert_one_line(exc, "no training run", "data and seq_len", "data=local")


@pytest.mark.slow
def test_train_init_from_starts_from_imported_weights(tmp_path, tokenizer, corpus):
    _, data = corpus
    # shaped like model=mamba-tiny at the byte tokenizer, so the composed config matches it exactly
    hf_mamba_dir(tmp_path / "hf", tokenizer, hidden_size=128, num_hidden_layers=4, state_size=16, time_step_rank="auto")
    import_pretrained(tmp_path / "hf", tmp_path / "m.ckpt")
    run_dir = tmp_path / "run"
    # a learning rate so small that two AdamW steps leave the weights where they started
    run_script("train.py", "experiment=smoke", "logger=none", "data=local", *data, f"hydra.run.dir={run_dir}",
               f"init_from={tmp_path / 'm.ckpt'}", "seq_len=32", "trainer.max_steps=2", "trainer.val_check_interval=2",
               "scheduler.warmup_steps=1", "optim.lr=1e-12", "test_after_training=false")
    imported, _, _ = load_trained_model(tmp_path / "m.ckpt")
    trained, _, meta = load_trained_model(run_dir / "checkpoints" / "last.ckpt")
    assert meta["run_config"]["init_from"] == str(tmp_path / "m.ckpt")
    for (name, a), b in zip(imported.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=0, msg=name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["init_from"] == str(tmp_path / "m.ckpt") and metrics["steps"] == 2


def load_tokenizer_of(tokenizer, tmp_path):
    """The tokenizer as a run reloads it from a directory (what the datamodule hands train)."""
    tokenizer.save_pretrained(tmp_path / "tok")
    return load_tokenizer(tmp_path / "tok")


def test_init_from_refusals(tmp_path, tokenizer):
    ckpt = write_ckpt(tiny_mamba(), tokenizer, tmp_path / "m.ckpt")
    with pytest.raises(ConfigError) as exc:  # a different architecture: the differing keys are listed
        load_initial_weights(ckpt, MambaLM(257, 48, 3, d_state=8), tokenizer)
    assert_one_line(exc, "init_from=", "differs in: d_model, n_layer")
    other = train_bpe(["some text to learn a few merges from"] * 20, vocab_size=270)
    with pytest.raises(ConfigError) as exc:
        load_initial_weights(ckpt, MambaLM(len(other), 32, 2, d_state=8), other)
    assert_one_line(exc, "different tokenizer", "tokenizer.name=")
    with pytest.raises(ConfigError) as exc:  # imported weights have nothing to resume
        check_resumable(ckpt, read_checkpoint(ckpt)["lethe"], tiny_mamba())
    assert_one_line(exc, "weights only", f"init_from={ckpt}")
    model = MambaLM(257, 32, 2, d_state=8)
    load_initial_weights(ckpt, model, load_tokenizer_of(tokenizer, tmp_path))
    assert torch.equal(model.embedding.weight, load_trained_model(ckpt)[0].embedding.weight)

    cfg = compose_config(f"init_from={ckpt}", f"ckpt_path={ckpt}")
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert_one_line(exc, "init_from", "ckpt_path", "exclusive")
    cfg = compose_config(f"init_from={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert_one_line(exc, "init_from=", "does not exist")


# ---- Mamba-2: Mamba2LM <-> Mamba2ForCausalLM -------------------------------------------------------
# (ngroups, headdim) at d_inner 64, and d_inner 48 with chunk_size 32 (not a multiple of it); the 40
# tokens of every comparison are 2.5 chunks of 16 and 1.25 of 32.
MAMBA2_CASES = {
    "g1-h16": dict(ngroups=1, headdim=16),
    "g2-h8-biases-dt_limit": dict(ngroups=2, headdim=8, bias=True, conv_bias=False, d_conv=3, dt_limit=[0.01, 0.5],
                                  residual_in_fp32=False, norm_eps=1e-6),
    "g4-h16": dict(ngroups=4, headdim=16),
    "d_inner48-chunk32": dict(d_model=24, ngroups=2, headdim=12, chunk_size=32),
}
HF_MAMBA2_CASES = {
    "g1-h16": {},
    "g2-h8-biases-time_step_limit": dict(num_heads=8, head_dim=8, n_groups=2, use_bias=True, use_conv_bias=False, conv_kernel=3,
                                         time_step_limit=(0.01, 0.5), residual_in_fp32=False, layer_norm_epsilon=1e-6),
    "d_inner48-chunk32": dict(hidden_size=24, num_heads=4, head_dim=12, n_groups=2, chunk_size=32),
}


@pytest.fixture
def hf_torch_mamba2(monkeypatch):
    """transformers' Mamba-2 on its pure-PyTorch functions, as without mamba_ssm and causal-conv1d
    (whose kernels need CUDA tensors), even where those are installed; run in eval mode, it never
    tries the fused training path."""
    for name in ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan", "mamba2_selective_state_update",
                 "mamba2_split_conv1d_scan_combined"):
        if hasattr(modeling_mamba2, name):
            monkeypatch.setattr(modeling_mamba2, name, inspect.unwrap(getattr(modeling_mamba2, name)))


def hf_mamba2_dir(path, tokenizer, **overrides):
    """A randomly initialized transformers Mamba-2 saved with save_pretrained, plus byte tokenizer files."""
    kw = dict(vocab_size=264, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=1, state_size=8,
              chunk_size=16, tie_word_embeddings=True) | overrides
    hf = perturbed(Mamba2ForCausalLM(Mamba2Config(**kw)))
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf


@pytest.mark.parametrize("case", MAMBA2_CASES)
def test_exported_mamba2_matches_in_transformers(tmp_path, tokenizer, hf_torch_mamba2, case):
    model = tiny_mamba2(**MAMBA2_CASES[case])
    c = model.config
    out = export_checkpoint(write_ckpt(model, tokenizer, tmp_path / "m.ckpt"), tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mamba2" and config["vocab_size"] == 264 and config["tie_word_embeddings"]
    nheads = c["expand"] * c["d_model"] // c["headdim"]
    assert (config["n_groups"], config["head_dim"], config["num_heads"]) == (c["ngroups"], c["headdim"], nheads)
    assert config["chunk_size"] == c["chunk_size"] and config["norm_before_gate"] is False and config["eos_token_id"] == 256
    x = ids(length=40)
    expected = lethe_logits(model, x)
    for cls in (Mamba2ForCausalLM, AutoModelForCausalLM):
        hf = cls.from_pretrained(out).eval()
        assert type(hf) is Mamba2ForCausalLM and hf.dtype == torch.float32 and not hf.training
        assert list(hf.config.time_step_limit) == (c["dt_limit"] or [0.0, math.inf])
        torch.testing.assert_close(hf_logits(hf, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", HF_MAMBA2_CASES)
def test_imported_transformers_mamba2_matches(tmp_path, tokenizer, hf_torch_mamba2, case):
    kw = HF_MAMBA2_CASES[case]
    hf = hf_mamba2_dir(tmp_path / "hf", tokenizer, **kw)
    meta = import_pretrained(tmp_path / "hf", tmp_path / "m.ckpt")
    c = meta["model_config"]
    assert meta["model_target"] == "lethe.models.mamba2.Mamba2LM" and c["pad_vocab_multiple"] == 8
    assert (c["ngroups"], c["headdim"], c["chunk_size"]) == (kw.get("n_groups", 1), kw.get("head_dim", 16), kw.get("chunk_size", 16))
    assert c["dt_limit"] == ([0.01, 0.5] if "time_step_limit" in kw else None) and c["bias"] is kw.get("use_bias", False)
    model, _, _ = load_trained_model(tmp_path / "m.ckpt")
    x = ids(length=40)
    torch.testing.assert_close(lethe_logits(model, x), hf_logits(hf.eval(), x), atol=ATOL, rtol=0)


def test_cli_mamba2_export_import_and_refusal(tmp_path, tokenizer, hf_torch_mamba2, capsys):
    model = tiny_mamba2(ngroups=2, headdim=8)
    ckpt = write_ckpt(model, tokenizer, tmp_path / "m.ckpt")
    interop_main(["export", str(ckpt), str(tmp_path / "hf")])
    interop_main(["import", str(tmp_path / "hf"), str(tmp_path / "back.ckpt")])
    out = capsys.readouterr().out
    assert "exported" in out and "imported" in out and "Mamba2LM" in out
    x = ids(length=40)
    expected = lethe_logits(model, x)
    torch.testing.assert_close(hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), x), expected, atol=ATOL, rtol=0)
    assert torch.equal(lethe_logits(load_trained_model(tmp_path / "back.ckpt")[0], x), expected)
    capsys.readouterr()  # e.g. the first-use notice of Lethe's CPU conv kernel
    # an unexportable model: one `error:` line and exit status 2
    mlp = write_ckpt(tiny_mamba2(d_intermediate=16), tokenizer, tmp_path / "mlp.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        interop_main(["export", str(mlp), str(tmp_path / "hf-mlp")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "d_intermediate=16" in err


@pytest.mark.parametrize("overrides,needles", [
    ({"d_intermediate": 16}, ["Mamba2LM", "MLP blocks", "d_intermediate=16", "no equivalent"]),
    ({"D_has_hdim": True}, ["Mamba2LM", "D_has_hdim=true", "one D per head", "no equivalent"]),
], ids=["mlp", "D_has_hdim"])
def test_unexportable_mamba2_is_refused(tmp_path, tokenizer, overrides, needles):
    with pytest.raises(LetheError) as exc:
        export_checkpoint(write_ckpt(tiny_mamba2(**overrides), tokenizer, tmp_path / "m.ckpt"), tmp_path / "hf")
    assert_one_line(exc, *needles)
    assert not (tmp_path / "hf" / "config.json").exists()


@pytest.mark.parametrize("field,value,needles", [
    ("rms_norm", False, ["gated RMSNorm"]),
    ("norm_before_gate", True, ["norm(y * silu(z))"]),
    ("time_step_limit", (0.5, 0.1), ["0 <= min <= max"]),
    ("time_step_limit", (-1.0, 1.0), ["0 <= min <= max"]),
    ("tie_word_embeddings", False, ["ties the LM head"]),
    ("hidden_act", "gelu", ["silu"]),
])
def test_unsupported_mamba2_features_are_refused(tmp_path, tokenizer, field, value, needles):
    kw = dict(vocab_size=264, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16, n_groups=1, state_size=8,
              tie_word_embeddings=True) | {field: value}
    Mamba2Config(**kw).save_pretrained(tmp_path / "hf")  # the config is refused before any weight is read
    tokenizer.save_pretrained(tmp_path / "hf")
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "m.ckpt")
    assert_one_line(exc, field, "not supported", *needles)
    assert not (tmp_path / "m.ckpt").exists()


def test_other_mamba2_variants_are_refused(tmp_path, tokenizer):
    # a Mamba-2 hybrid (attention and MLP layers between the mixers): another model_type
    hybrid = BambaConfig(vocab_size=264, hidden_size=32, num_hidden_layers=2, mamba_n_heads=4, mamba_d_head=16, tie_word_embeddings=True)
    hybrid.save_pretrained(tmp_path / "bamba")
    tokenizer.save_pretrained(tmp_path / "bamba")
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "bamba", tmp_path / "m.ckpt")
    assert_one_line(exc, "model_type='bamba'", "not supported", "mamba2")

    # weights of a per-channel D (mamba_ssm's D_has_hdim=True) under transformers' names: refused by shape
    hf_mamba2_dir(tmp_path / "hf", tokenizer)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["backbone.layers.1.mixer.D"] = torch.ones(64)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LetheError) as exc:
        import_pretrained(tmp_path / "hf", tmp_path / "m.ckpt")
    assert_one_line(exc, "backbone.layers.1.mixer.D", "(64,)", "(4,)")
    assert not (tmp_path / "m.ckpt").exists()
