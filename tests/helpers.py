"""Helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path).
Fixtures live in conftest.py; no test module imports another."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf

from lethe.config import CONF_DIR as CONF
from lethe.config import compose
from lethe.ops import SCAN_IMPL_CHOICES, SSD_IMPL_CHOICES, selective_scan

ROOT = Path(__file__).resolve().parents[1]
BYTE_TOKENIZER = {"_target_": "lethe.data.tokenizer.byte_level"}
BYTE_EOS = 256  # the byte tokenizer's <|endoftext|>
NEOX_VOCAB = 50280  # GPT-NeoX tokenizer padded to a multiple of 8, the paper's
# A small, fast slice of the stdlib corpus, and a run of seconds on it (experiment=smoke)
SMALL_DATA = ["data.source.max_bytes=400000", "data.num_proc=1"]
SMOKE = ["experiment=smoke", "logger=csv", *SMALL_DATA]


def decode_in_segments(model, ids, segments, with_states: bool = False):
    """Logits of `ids` fed through decoding states in pieces of the given lengths (and the states)."""
    states = model.empty_states(ids.shape[0], ids.shape[1])
    logits, start = [], 0
    with torch.no_grad():
        for length in segments:
            logits.append(model(ids[:, start : start + length], states))
            start += length
    assert start == ids.shape[1]
    return (torch.cat(logits, dim=1), states) if with_states else torch.cat(logits, dim=1)


def options(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(*overrides, config_name: str = "train"):
    """The composed config, as train.py would see it but without Hydra's own node."""
    return compose(config_name, *overrides)


def model_config(name: str, **overrides) -> dict:
    """A model group option as the plain dict a run instantiates (its family's base merged in)."""
    cfg = compose_config(f"model={name}").model
    return {**OmegaConf.to_container(cfg, resolve=True), **overrides}


def data_config(name: str):
    """A data group option, composed (DictConfig, still editable)."""
    return compose_config(f"data={name}").data


def assert_one_line(exc_info, *needles):
    """The error is one line and names every needle."""
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
# Scan implementations that run on CPU tensors ("cuda" needs a GPU: tests/test_kernels.py), and
# those that take float64 (the fused kernels compute in float32 and take float32/16 inputs).
CPU_SCAN_IMPLS = tuple(impl for impl in SCAN_IMPL_CHOICES if impl != "cuda")
FLOAT64_SCAN_IMPLS = ("auto", "reference", "chunked")
# Mamba-2's SSD scan: the implementations that run on CPU tensors
CPU_SSD_IMPLS = tuple(impl for impl in SSD_IMPL_CHOICES if impl != "cuda")
FLOAT64_SSD_IMPLS = ("auto", "reference", "chunked")


def run_script(script, *args, cwd=ROOT, env_extra=None, check=True, timeout=600, launcher=()):
    """Run one of the repository's scripts (train.py, eval.py, ...) offline in a fresh interpreter.
    env_extra adds variables; one whose value is None is removed from the script's environment.
    launcher: interpreter arguments before the script (`-m torch.distributed.run ...`: torchrun starts it)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_smoke(run_dir, data_dir, *overrides, **kwargs):
    """train.py with experiment=smoke on the small stdlib slice, into run_dir."""
    return run_script("train.py", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides, **kwargs)


def logged(run_dir, name) -> dict:
    """{step: value} of one metric in the run's CSV log (the rows that carry it)."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def train_losses(run_dir) -> dict:
    return logged(run_dir, "train/loss")


def offline_wandb_env(tmp_path) -> dict:
    """No WANDB_* variable (the tests' WANDB_MODE=disabled included) and no API key: what wandb
    does is then the config's own choice. Settings go to an empty directory, so a user's
    ~/.config/wandb cannot switch the mode either."""
    return {**{k: None for k in os.environ if k.startswith("WANDB_")}, "WANDB_MODE": None, "WANDB_API_KEY": None,
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-settings")}


def read_wandb_run(offline_run: Path) -> dict:
    """An offline run as wandb itself reads it back (`wandb leet inspect --summary --json`, the
    reader of its run log): config, summary, state."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--summary", "--json", str(offline_run)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def column(ds, name="text") -> list:
    return list(ds[name])


def expected_stream(texts) -> np.ndarray:
    """The packed stream of these documents under the byte tokenizer: UTF-8 bytes, <eos> between."""
    out = []
    for i, t in enumerate(texts):
        out += ([BYTE_EOS] if i else []) + list(t.encode("utf-8"))
    return np.array(out, dtype=np.int64)


def sample_documents(n=60, seed=0):
    """Deterministic documents with non-ASCII text and no blank lines inside."""
    rng = random.Random(seed)
    words = ["mamba", "state", "space", "scan", "résumé", "naïve", "Ωmega", "😀", "token", "x=1;"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) for i in range(n)]


def write_texts(path: Path, texts, fmt: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        path.write_text("\n\n".join(texts), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), path)
    return path


def write_corpus(directory: Path, n: int = 60) -> Path:
    """A directory holding one jsonl file of n sample documents."""
    write_texts(Path(directory) / "docs.jsonl", sample_documents(n), "jsonl")
    return Path(directory)


def make_dm(tmp_path, source, tokenizer=None, seq_len=16, **kw):
    """An LMDataModule (batches of 4, one tokenizing process) caching under tmp_path/cache."""
    from lethe.data import LMDataModule

    kw = {"batch_size": 4, "num_proc": 1, "cache_dir": tmp_path / "cache", **kw}
    return LMDataModule(source=source, tokenizer=tokenizer or BYTE_TOKENIZER, seq_len=seq_len, **kw)


def local_dm(tmp_path, n=60, **kw):
    """A set-up data module over n sample documents in a local jsonl file (15% val, 15% test)."""
    write_texts(tmp_path / "corpus" / "docs.jsonl", sample_documents(n), "jsonl")
    source = {"_target_": "lethe.data.sources.local_corpus", "path": str(tmp_path / "corpus" / "*.jsonl"),
              "holdout": {"val": 0.15, "test": 0.15}}
    dm = make_dm(tmp_path, source, **kw)
    dm.setup()
    return dm


def perturbed(model, scale=0.05):
    """The model in eval mode with every parameter moved off its init. Init leaves some at exact
    constants (norm weights 1, D 1, biases 0), where a conversion or a decoding step that forgot
    one of them would still match by luck."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def document_starts(batch, length, seed, every=20):
    """(batch, length) bool: documents starting at random places (about one in `every` steps),
    and always at step 0, at the last step and at two consecutive steps (a one-token document)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=g) < 1 / every
    starts[:, 0] = starts[:, -1] = True
    starts[:, length // 2: length // 2 + 2] = True
    return starts


# ---- selective-scan cases (test_scan.py, test_kernels.py) -------------------------------------
def make_inputs(batch, channels, length, d_state, dtype=torch.float32, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(
        u=randn(batch, channels, length).to(dtype),
        delta=(randn(batch, channels, length) * delta_scale - 1.0).to(dtype),
        A=-torch.exp(randn(channels, d_state) * 0.5).to(torch.float32 if dtype != torch.float64 else dtype),
        B=randn(batch, d_state, length).to(dtype),
        C=randn(batch, d_state, length).to(dtype),
        D=randn(channels).to(torch.float32 if dtype != torch.float64 else dtype),
        z=randn(batch, channels, length).to(dtype),
        delta_bias=(randn(channels) * 0.1).to(torch.float32 if dtype != torch.float64 else dtype),
        initial_state=randn(batch, channels, d_state).to(torch.float32 if dtype != torch.float64 else dtype),
    )


def run(impl, inputs, use_z, use_bias, use_state, document_starts=None):
    """y, last state and the gradients of every input, computed on the impl's device, returned on
    CPU. document_starts (batch, length): where documents start."""
    device = "cuda" if impl == "cuda" else "cpu"
    args = {k: v.detach().to(device, copy=True).requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    if not use_z:
        args.pop("z")
    if not use_bias:
        args.pop("delta_bias")
    if not use_state:
        args.pop("initial_state")
    y, last = selective_scan(**args, impl=impl, document_starts=None if document_starts is None else document_starts.to(device))
    # a loss that weights every output and the final state, so every gradient path is exercised
    g = torch.Generator().manual_seed(1)
    weights_y, weights_last = torch.randn(y.shape, generator=g).to(device), torch.randn(last.shape, generator=g).to(device)
    loss = (y.float() * weights_y).sum() + (last * weights_last).sum()
    loss.backward()
    return y.cpu(), last.cpu(), {k: v.grad.cpu() for k, v in args.items()}


# ---- closed-form parameter counts, written from the architectures (not from the modules) ------
def padded(vocab: int, multiple: int = 8) -> int:
    return -(-vocab // multiple) * multiple


def transformer_params(c: dict, vocab: int) -> int:
    d = c["d_model"]
    f = c.get("d_ff") or 64 * -(-8 * d // (3 * 64))  # null: 8/3 d rounded up to a multiple of 64
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # qkv + o, gate/up/down, two norms
    return padded(vocab, c.get("pad_vocab_multiple", 8)) * d + c["n_layer"] * per_layer + d


def mamba_params(c: dict, vocab: int) -> int:
    d = c["d_model"]
    e, n, k = c.get("expand", 2) * d, c.get("d_state", 16), c.get("d_conv", 4)
    r = -(-d // 16) if c.get("dt_rank", "auto") == "auto" else c["dt_rank"]
    selective = {"delta": True, "B": True, "C": True, **(c.get("selective") or {})}
    x_proj = e * (r * selective["delta"] + n * selective["B"] + n * selective["C"])
    delta = r * e + e if selective["delta"] else e  # dt_proj weight + bias, or a bias alone
    constant_bc = n * (not selective["B"]) + n * (not selective["C"])
    bias = c.get("bias", False)
    in_proj, out_proj = d * 2 * e + 2 * e * bias, e * d + d * bias
    conv = e * k + e * c.get("conv_bias", True)
    per_layer = in_proj + conv + x_proj + delta + constant_bc + e * n + e + out_proj + d  # A_log, D, norm
    return padded(vocab, c.get("pad_vocab_multiple", 8)) * d + c["n_layer"] * per_layer + d


def mamba2_params(c: dict, vocab: int) -> int:
    d = c["d_model"]
    e, n, k, g = c.get("expand", 2) * d, c.get("d_state", 128), c.get("d_conv", 4), c.get("ngroups", 1)
    heads, conv_dim, bias = e // c.get("headdim", 64), e + 2 * g * n, c.get("bias", False)
    in_proj = d * (e + conv_dim + heads) + (e + conv_dim + heads) * bias  # [z, xBC, dt]
    conv = conv_dim * k + conv_dim * c.get("conv_bias", True)
    ssm = heads + heads + (e if c.get("D_has_hdim", False) else heads)  # dt_bias, A_log, D
    f = c.get("d_intermediate", 0)
    mlp = 3 * d * f + d if f else 0  # gate/up/down and its norm
    per_layer = in_proj + conv + ssm + e + e * d + d * bias + d + mlp  # gated norm, out_proj, block norm
    return padded(vocab, c.get("pad_vocab_multiple", 8)) * d + c["n_layer"] * per_layer + d


def hybrid_params(c: dict, vocab: int) -> int:
    """A pattern's layers, each counted as its family counts one layer (its own block norm included)."""
    d = c["d_model"]
    shared = padded(vocab, c.get("pad_vocab_multiple", 8)) * d + d  # tied embedding, final norm

    def one_layer(count, settings):
        return count({"d_model": d, "n_layer": 1, **settings}, vocab) - shared

    d_ff = (c.get("mlp") or {}).get("d_ff") or 64 * -(-8 * d // (3 * 64))
    per_letter = {"m": one_layer(mamba_params, c.get("mamba") or {}), "M": one_layer(mamba2_params, c.get("mamba2") or {}),
                  "*": 4 * d * d + d, "-": 3 * d * d_ff + d}
    return shared + sum(per_letter[letter] for letter in c["pattern"])


def family_params(c: dict, vocab: int) -> int:
    family = c["_target_"].rsplit(".", 1)[-1]
    return {"MambaLM": mamba_params, "Mamba2LM": mamba2_params, "TransformerLM": transformer_params,
            "HybridLM": hybrid_params}[family](c, vocab)
