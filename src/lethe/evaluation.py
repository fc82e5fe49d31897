"""Scoring trained checkpoints: perplexity, bits per byte and answer accuracy over whole splits,
at the training length and at other context lengths (what `eval.py ckpt=...` runs).

Token-weighted: a split's loss is its summed next-token NLL divided by the number of scored
tokens (not a mean of batch means); that number is reported exactly. Bits per byte divide the
same summed NLL (in bits) by the UTF-8 bytes the scored tokens stand for (separators count 0),
so models with different tokenizers compare on the same text.

Context length and documents: a split is its documents joined by <eos> into one stream, cut into
consecutive blocks of L tokens (LMDataModule). Each block is scored from an empty state (no
context crosses a block boundary); inside a block, context does cross document boundaries: the
model sees the <eos> separator and the end of the previous document, exactly as in training.
At L, the first `max_tokens // L` blocks are scored (all when max_tokens is null), so a
max_tokens that is a multiple of every L scores the very same tokens at every length. Synthetic
tasks are generated afresh at length L (their examples, not a stream).
"""

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lethe.config import instantiate
from lethe.data.datamodule import cross_document_setting
from lethe.data.tokenizer import token_byte_lengths
from lethe.errors import ConfigError, LetheError, first_line, is_int, is_number, require, require_int
from lethe.generation import decoding_state_bytes
from lethe.metrics import perplexity, summed_nll
from lethe.training.checkpoint import load_trained_model
from lethe.training.resume import run_dir_of


def find_checkpoints(spec) -> list[Path]:
    """Checkpoint files from `ckpt=`: a file, a run or sweep directory (each run's best.ckpt, else
    its last.ckpt), or a list of those. A sharded FSDP checkpoint is a directory named *.ckpt."""
    found = []
    for item in spec if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec) else [spec]:
        path = Path(str(item))
        if path.is_dir() and path.suffix != ".ckpt":
            runs = sorted({p.parent for p in path.rglob("*.ckpt")})
            picked = [next((r / n for n in ("best.ckpt", "last.ckpt") if (r / n).exists()), None) for r in runs]
            if not any(picked):
                raise LetheError(f"ckpt={path} holds no best.ckpt or last.ckpt; point at a run, a sweep or a .ckpt file")
            found += [p for p in picked if p]
        elif path.suffix != ".ckpt" and not path.exists():
            raise LetheError(f"ckpt={path} does not exist; pass a .ckpt file, a run or a sweep directory")
        else:
            found.append(path)  # read_checkpoint explains a missing, corrupt or foreign file
    return found


@dataclass
class Scores:
    tokens: int
    loss: float
    ppl: float
    bpb: float | None
    acc: float

    @classmethod
    def from_sums(cls, nll: float, tokens: int, correct: int, num_bytes: int):
        if tokens == 0:
            raise LetheError("no token was scored; raise max_tokens or lower the length")
        loss = nll / tokens
        bpb = nll / (math.log(2) * num_bytes) if num_bytes else None
        return cls(tokens, loss, perplexity(loss), bpb, correct / tokens)


@torch.no_grad()
def score(model, loader, byte_lengths: torch.Tensor, max_blocks: int | None = None, desc: str = "scoring") -> Scores:
    """Token-weighted scores of the first max_blocks blocks (all if None) the loader yields."""
    nll, tokens, correct, num_bytes, blocks = 0.0, 0, 0, 0, 0
    device = next(model.parameters()).device
    total = len(loader) if max_blocks is None else math.ceil(max_blocks / loader.batch_size)
    for batch in tqdm(loader, desc=desc, unit="batch", total=min(total, len(loader)), leave=False):
        if max_blocks is not None:
            batch = {k: v[: max_blocks - blocks] for k, v in batch.items()}
            if len(batch["labels"]) == 0:
                break
        blocks += len(batch["labels"])
        batch = {k: v.to(device) for k, v in batch.items()}
        batch_nll, batch_tokens, batch_correct = summed_nll(model, batch)
        labels = batch["labels"]
        nll += batch_nll.item()  # summed in float64 across batches
        tokens += int(batch_tokens)
        correct += int(batch_correct)
        num_bytes += int(byte_lengths.to(device)[labels[labels != -100]].sum())
    return Scores.from_sums(nll, tokens, correct, num_bytes)


class CheckpointEvaluator:
    """One checkpoint with its own tokenizer, scored on its training data (or `cfg.data`)."""

    def __init__(self, path: Path, cfg: DictConfig):
        self.path, self.cfg = path, cfg
        self.model, self.tokenizer, self.meta = load_trained_model(path)
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        run = self.meta["run_config"] or {}
        self.run_name = run.get("run_name") or path.stem
        self.data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else run.get("data")
        # documents are scored as the checkpoint was trained (cross-document context or resets)
        # unless eval's cross_document says otherwise; synthetic tasks have no such switch
        setting = cross_document_setting(run.get("data")) if cfg.get("cross_document") is None else cfg.cross_document
        if setting is not None and cross_document_setting(self.data) is not None:
            self.data = {**self.data, "cross_document": setting}
        self.seq_len = cfg.seq_len or run.get("seq_len")
        scores_data = bool(cfg.splits or cfg.lengths)  # tasks= alone needs neither data nor seq_len
        if scores_data and (self.data is None or self.seq_len is None):
            missing = " and ".join(k for k, v in (("data", self.data), ("seq_len", self.seq_len)) if v is None)
            raise ConfigError(f"checkpoint {path} has no training run to take the {missing} from; name them, "
                              "e.g. data=local data.source.path='corpus/*.txt' seq_len=1024")
        self.byte_lengths = torch.from_numpy(token_byte_lengths(self.tokenizer))
        self.fingerprint = None

    def datamodule(self, seq_len: int, tokenizer_dir: str):
        batch_size = max(1, self.cfg.batch_size * self.seq_len // seq_len)  # about the same tokens per batch
        datamodule = instantiate({**self.data, "eval_batch_size": batch_size},
                                 tokenizer={"_target_": "lethe.data.tokenizer.pretrained", "name": tokenizer_dir}, seq_len=seq_len,
                                 cache_dir=self.cfg.paths.data_dir, _recursive_=False)
        datamodule.setup()
        self.fingerprint = datamodule.fingerprint
        return datamodule

    def score_split(self, split: str, seq_len: int, tokenizer_dir: str) -> Scores:
        loader = self.datamodule(seq_len, tokenizer_dir).eval_dataloader(split)
        max_blocks = None if self.cfg.max_tokens is None else max(1, self.cfg.max_tokens // seq_len)
        return score(self.model, loader, self.byte_lengths, max_blocks, desc=f"{self.run_name} {split} @{seq_len}")

    def evaluate(self) -> dict:
        cfg = self.cfg
        for split in [*cfg.splits, cfg.length_split]:
            if split not in ("train", "val", "test"):
                raise ConfigError(f"split {split!r} in splits/length_split; choose train, val or test")
        lengths = sorted({max(1, round(f * self.seq_len)) for f in cfg.lengths or []}) if self.seq_len else []
        max_seq_len = getattr(self.model, "max_seq_len", None)
        if max_seq_len is not None and cfg.past_max_seq_len:
            self.model.max_seq_len = None  # RoPE has no learned positions: the bound guards, it does not limit
        elif max_seq_len is not None and self.seq_len:
            self.model.check_length(self.seq_len, "seq_len", "lower seq_len, or score it anyway with past_max_seq_len=true")
            if past := [n for n in lengths if n > max_seq_len]:
                print(f"warning: {self.run_name}: lengths {', '.join(map(str, past))} exceed its model.max_seq_len={max_seq_len} "
                      "and are not scored; past_max_seq_len=true scores them (RoPE extrapolates, untrained)", file=sys.stderr)
                lengths = [n for n in lengths if n <= max_seq_len]
        run_metrics = self.run_metrics()
        results = {"run": self.run_name, "ckpt": str(self.path), "model": self.meta["model_target"].rsplit(".", 1)[-1],
                   "tokenizer": self.tokenizer_name(), "params": self.meta["num_params"], "train_seq_len": self.seq_len,
                   "cross_document": cross_document_setting(self.data),
                   "tokens_trained": run_metrics.get("tokens_seen"),
                   "train_tokens_per_s": run_metrics.get("train_tokens_per_s"),
                   # what decoding one sequence of the training length holds: SSM states, KV caches
                   "state_mb": decoding_state_bytes(self.model, self.seq_len) / 2**20 if self.seq_len else None}
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            # the checkpoint's own tokenizer, from its files: eval never re-trains or downloads one
            self.tokenizer.save_pretrained(tokenizer_dir)
            for split in cfg.splits:
                results[split] = vars(self.score_split(split, self.seq_len, tokenizer_dir))
            results["lengths"] = []
            for length in lengths:
                same = length == self.seq_len and cfg.length_split in cfg.splits
                scores = results[cfg.length_split] if same else vars(self.score_split(cfg.length_split, length, tokenizer_dir))
                results["lengths"].append({"length": length, **scores})
        results["corpus_fingerprint"] = self.fingerprint
        results["synthetic"] = str(self.fingerprint).startswith("synthetic")
        scored = self.fingerprint is not None
        results["fingerprint_matches_run"] = self.fingerprint == self.meta.get("corpus_fingerprint") if scored else None
        if cfg.get("tasks"):
            results["tasks"] = self.score_tasks()
        return results

    def score_tasks(self) -> dict:
        """Zero-shot tasks through lm-evaluation-harness (lethe.harness), on the model in memory."""
        try:
            from lethe.harness import LetheLM, run_tasks
        except ImportError as exc:
            raise LetheError(f"tasks= needs lm-evaluation-harness ({first_line(exc)}): pip install -e '.[eval]' "
                             "(make install includes it)") from None
        harness = self.cfg.harness
        lm = LetheLM(loaded=(self.model, self.tokenizer), batch_size=harness.batch_size, max_length=harness.max_length)
        return run_tasks(lm, self.cfg.tasks, self.cfg.limit, harness.include_path)

    def tokenizer_name(self) -> str:
        """Which tokenizer, in a few characters: the config's builder (or an imported one) and its size."""
        spec = (self.meta["run_config"] or {}).get("tokenizer") or {}
        kind = str(spec.get("_target_") or spec.get("kind") or "imported").rsplit(".", 1)[-1]
        return f"{kind} ({len(self.tokenizer):,})"

    def run_metrics(self) -> dict:
        """The training run's metrics.json ({} for a checkpoint outside a run, e.g. an imported one)."""
        run_dir = run_dir_of(self.path)
        metrics = run_dir / "metrics.json" if run_dir else None
        return json.loads(metrics.read_text()) if metrics and metrics.is_file() else {}


def evaluate_checkpoints(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """(scored rows, failures): a checkpoint that cannot be scored (missing, corrupt, foreign, no
    data) is recorded with its one-line error and the others are still scored."""
    require_int("batch_size", cfg.batch_size)
    require(cfg.get("cross_document") in (None, True, False), "cross_document", cfg.get("cross_document"),
            "null (as each checkpoint was trained), false (reset at document starts) or true")
    require(cfg.max_tokens is None or is_int(cfg.max_tokens), "max_tokens", cfg.max_tokens, "an integer >= 1, or null for whole splits")
    for factor in cfg.lengths or []:
        require(is_number(factor) and factor > 0, "lengths", list(cfg.lengths),
                "multiples > 0 of the training length, e.g. [0.5,1,2,4,8] ([] turns the sweep off)")
    paths = find_checkpoints(cfg.ckpt)
    rows, failed = [], []
    for i, path in enumerate(paths):
        print(f"[{i + 1}/{len(paths)}] {path}", flush=True)
        try:
            rows.append(CheckpointEvaluator(path, cfg).evaluate())
        except LetheError as exc:
            print(f"error: {path}: {first_line(exc)}", file=sys.stderr, flush=True)
            failed.append({"ckpt": str(path), "error": first_line(exc)})
    return rows, failed
