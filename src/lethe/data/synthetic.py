"""Synthetic recall tasks as data modules: selective copying and induction heads (Mamba paper,
section 4.1) and multi-query associative recall (MQAR, Zoology: Arora et al. 2023).

Every example is generated from (data_seed, split, index) alone, so a split is identical for any
batch size, worker count or resume point; training reads its examples in LMDataModule's seeded,
resumable order. Labels are -100 everywhere but at the answer positions, so the loss and the
accuracy (`val/acc`, argmax == answer; see `summed_nll`) count answers only. Symbols are single
characters of the run's tokenizer (the byte tokenizer by default): checkpoints carry it and
generate.py prints examples readably. Chance accuracy of a constant guesser is 1 / answer symbols.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lethe.config import instantiate
from lethe.data.corpus import SPLITS
from lethe.data.fingerprint import digest
from lethe.data.datamodule import LMDataModule, _plain
from lethe.data.tokenizer import build_tokenizer, tokenizer_fingerprint
from lethe.errors import ConfigError, require

LETTERS, CAPITALS = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NOISE, MARK, TRIGGER = ".", "?", "#"
IGNORE = -1  # "no answer here", in symbol space (becomes label -100)


@dataclass
class SelectiveCopying:
    """`num_tokens` data tokens scattered at random positions among noise, then as many markers;
    at each marker the model must output the next data token in order (no teacher forcing).
    Random spacing is what defeats a time-invariant (LTI) model."""

    num_tokens: int = 16
    vocab: int = 8  # distinct data tokens

    def __post_init__(self):
        require(1 <= self.vocab <= len(LETTERS), "data.task.vocab", self.vocab, f"an integer in 1..{len(LETTERS)}")
        require(self.num_tokens >= 1, "data.task.num_tokens", self.num_tokens, "an integer >= 1")
        self.alphabet = NOISE + MARK + LETTERS[: self.vocab]
        self.num_answers = self.vocab

    def min_length(self) -> int:
        return 2 * self.num_tokens

    def example(self, rng: np.random.Generator, seq_len: int):
        k, context = self.num_tokens, seq_len - self.num_tokens
        inputs = np.zeros(seq_len, dtype=np.int64)  # NOISE
        targets = np.full(seq_len, IGNORE, dtype=np.int64)
        data = 2 + rng.integers(self.vocab, size=k)
        inputs[np.sort(rng.choice(context, k, replace=False))] = data
        inputs[context:] = 1  # MARK
        targets[context:] = data
        return inputs, targets


@dataclass
class InductionHeads:
    """Random tokens with a trigger somewhere, followed by token x; the sequence ends with the
    trigger again and the answer is x. Solving it means recalling after a match, at any length."""

    vocab: int = 16

    def __post_init__(self):
        require(2 <= self.vocab <= len(LETTERS), "data.task.vocab", self.vocab, f"an integer in 2..{len(LETTERS)}")
        self.alphabet = TRIGGER + LETTERS[: self.vocab]
        self.num_answers = self.vocab

    def min_length(self) -> int:
        return 3

    def example(self, rng: np.random.Generator, seq_len: int):
        inputs = 1 + rng.integers(self.vocab, size=seq_len)
        targets = np.full(seq_len, IGNORE, dtype=np.int64)
        position = rng.integers(seq_len - 2)  # the answer at position + 1 is never the final trigger
        inputs[position] = inputs[-1] = 0  # TRIGGER
        targets[-1] = inputs[position + 1]
        return inputs, targets


@dataclass
class AssociativeRecall:
    """MQAR: `num_pairs` key-value pairs (distinct keys), then every key once more in random order
    at random places among noise, each followed by its value; the answer at a query key is its
    value. Keys are lower-case letters, values capitals."""

    num_pairs: int = 8
    num_keys: int = 16
    num_values: int = 16

    def __post_init__(self):
        require(1 <= self.num_keys <= len(LETTERS), "data.task.num_keys", self.num_keys, f"an integer in 1..{len(LETTERS)}")
        require(1 <= self.num_pairs <= self.num_keys, "data.task.num_pairs", self.num_pairs,
                f"an integer in 1..data.task.num_keys={self.num_keys} (the keys are distinct)")
        require(1 <= self.num_values <= len(CAPITALS), "data.task.num_values", self.num_values, f"an integer in 1..{len(CAPITALS)}")
        self.alphabet = NOISE + LETTERS[: self.num_keys] + CAPITALS[: self.num_values]
        self.num_answers = self.num_values

    def min_length(self) -> int:
        return 4 * self.num_pairs

    def example(self, rng: np.random.Generator, seq_len: int):
        n = self.num_pairs
        keys = 1 + rng.choice(self.num_keys, n, replace=False)
        values = 1 + self.num_keys + rng.integers(self.num_values, size=n)
        inputs = np.zeros(seq_len, dtype=np.int64)  # NOISE
        targets = np.full(seq_len, IGNORE, dtype=np.int64)
        inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2] = keys, values
        slots = 2 * n + 2 * np.sort(rng.choice((seq_len - 2 * n) // 2, n, replace=False))  # query positions
        order = rng.permutation(n)
        inputs[slots], inputs[slots + 1] = keys[order], values[order]
        targets[slots] = values[order]
        return inputs, targets


class TaskExamples(torch.utils.data.Dataset):
    """Examples index 0 .. size-1 of one split, each generated on demand from its own seed."""

    def __init__(self, task, token_ids: np.ndarray, seq_len: int, size: int, data_seed: int, split: str):
        self.task, self.token_ids, self.seq_len, self.size = task, token_ids, seq_len, size
        self.seed = (data_seed, SPLITS.index(split))

    def __len__(self):
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"example {i} out of range (0..{self.size - 1})")
        inputs, targets = self.task.example(np.random.default_rng([*self.seed, i]), self.seq_len)
        labels = np.where(targets == IGNORE, -100, self.token_ids[np.maximum(targets, 0)])
        return {"input_ids": torch.from_numpy(self.token_ids[inputs]), "labels": torch.from_numpy(labels)}


def symbol_token_ids(alphabet: str, tokenizer) -> np.ndarray:
    """The token id of each symbol; each must be one token of the tokenizer."""
    ids = [tokenizer.encode(symbol, add_special_tokens=False) for symbol in alphabet]
    bad = [s for s, i in zip(alphabet, ids) if len(i) != 1]
    if bad:
        raise ConfigError(f"the tokenizer splits the task symbols {bad!r} into several tokens; use tokenizer=byte")
    return np.array([i[0] for i in ids], dtype=np.int64)


class SyntheticDataModule(LMDataModule):
    """An LMDataModule whose splits are generated task examples of seq_len tokens instead of
    blocks of a corpus: training order, resume position and evaluation sharding are inherited."""

    def __init__(self, task: dict, tokenizer: dict, seq_len: int, num_examples: dict, batch_size: int = 32,
                 eval_batch_size=None, num_workers: int = 0, cache_dir="data", seed: int = 0, data_seed: int = 0):
        """task: a task config (`_target_` one of the classes above); num_examples: {train, val,
        test: count}; seed: training order; data_seed: the examples themselves (fixed, so runs
        with different seeds are scored on the same val/test examples)."""
        super().__init__(source={}, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, cache_dir=cache_dir, seed=seed)
        self.task = instantiate(_plain(task))
        self.num_examples = _plain(num_examples)
        if set(self.num_examples) != set(SPLITS) or any(not isinstance(n, int) or n < 1 for n in self.num_examples.values()):
            raise ConfigError(f"data.num_examples={self.num_examples!r}; give {{train, val, test}} positive counts")
        if seq_len < self.task.min_length():
            raise ConfigError(f"seq_len={seq_len} is too short for {type(self.task).__name__} "
                              f"(at least {self.task.min_length()} tokens)")
        self.data_seed = data_seed

    def _build(self):
        if self.blocks:
            return
        self.tokenizer = build_tokenizer(self.tokenizer_spec, self.cache_dir)
        token_ids = symbol_token_ids(self.task.alphabet, self.tokenizer)
        # seq_len is left out: the same task scored at other lengths (eval.py lengths=...) keeps its identity
        self.fingerprint = "synthetic-" + digest(type(self.task).__name__, asdict(self.task), self.num_examples,
                                                 self.data_seed, tokenizer_fingerprint(self.tokenizer), size=8)
        self.blocks = {split: TaskExamples(self.task, token_ids, self.seq_len, n, self.data_seed, split)
                       for split, n in self.num_examples.items()}
        self.token_counts = {split: n * self.seq_len for split, n in self.num_examples.items()}
