"""The synthetic tasks (data=selective-copying|induction-heads|mqar): every answer follows from the
inputs, the accuracy counts answers only (a perfect oracle scores 100%, a constant guess chance)."""

import numpy as np
import pytest
import torch

from helpers import BYTE_TOKENIZER, data_config
from lethe.config import instantiate
from lethe.errors import ConfigError
from lethe.metrics import summed_nll

LENGTH = 48


def datamodule(name, seq_len=LENGTH, **overrides):
    cfg = data_config(name)
    cfg.seed = 7
    cfg.num_examples = {"train": 1000, "val": 256, "test": 256}
    cfg.merge_with(overrides)
    dm = instantiate(cfg, tokenizer=BYTE_TOKENIZER, seq_len=seq_len, cache_dir="/nonexistent", _recursive_=False)
    dm.setup()
    return dm


# Independent solvers, written from the task definitions over decoded text (not the generators).
def solve_selective_copying(text):
    context = text.rstrip("?")
    return [c for c in context if c != "."]


def solve_induction_heads(text):
    return [text[text.index("#") + 1]]


def solve_mqar(text, num_pairs=8):
    pairs = {text[i]: text[i + 1] for i in range(0, 2 * num_pairs, 2)}
    return [pairs[c] for c in text[2 * num_pairs:] if c in pairs]


SOLVERS = {"selective-copying": solve_selective_copying, "induction-heads": solve_induction_heads, "mqar": solve_mqar}


@pytest.mark.parametrize("name", SOLVERS)
def test_answers_follow_from_the_inputs(name):
    dm = datamodule(name)
    for split in ("train", "val", "test"):
        for i in range(40):
            example = dm.blocks[split][i]
            text = dm.tokenizer.decode(example["input_ids"])
            answers = dm.tokenizer.decode(example["labels"][example["labels"] != -100])
            assert len(text) == LENGTH and list(answers) == SOLVERS[name](text), (split, i, text)
    first = dm.blocks["val"][3]
    assert torch.equal(first["input_ids"], datamodule(name).blocks["val"][3]["input_ids"])  # a function of the index
    assert not torch.equal(first["input_ids"], dm.blocks["test"][3]["input_ids"])  # splits differ


class Oracle(torch.nn.Module):
    """Logits that put all mass on `answer(input_ids)` at every position."""

    def __init__(self, answer, vocab=257):
        super().__init__()
        self.answer, self.vocab = answer, vocab

    def forward(self, input_ids):
        return torch.nn.functional.one_hot(self.answer(input_ids), self.vocab).float() * 20


def accuracy(model, dm, split="test"):
    correct = total = 0
    for batch in dm.eval_dataloader(split):
        _, tokens, right = summed_nll(model, batch)
        correct, total = correct + int(right), total + int(tokens)
    return correct / total, total


@pytest.mark.parametrize("name,answers_per_example", [("selective-copying", 16), ("induction-heads", 1), ("mqar", 8)])
def test_oracle_scores_100_and_a_constant_guess_scores_chance(name, answers_per_example):
    dm = datamodule(name)

    def oracle_answer(input_ids):
        out = torch.zeros_like(input_ids)
        for row, ids in enumerate(input_ids):
            text = dm.tokenizer.decode(ids)
            answers = [ord(c) for c in SOLVERS[name](text)]
            if name == "selective-copying":
                out[row, -len(answers):] = torch.tensor(answers)
            elif name == "induction-heads":
                out[row, -1] = answers[0]
            else:  # the answer sits right after each query key
                keys = [i for i in range(16, len(text)) if text[i].islower()]
                out[row, keys] = torch.tensor(answers)
        return out

    acc, total = accuracy(Oracle(oracle_answer), dm)
    assert acc == 1.0 and total == 256 * answers_per_example
    first_answer = dm.tokenizer.decode(dm.blocks["test"][0]["labels"][dm.blocks["test"][0]["labels"] != -100])[0]
    acc, _ = accuracy(Oracle(lambda ids: torch.full_like(ids, ord(first_answer))), dm)
    chance = 1 / dm.task.num_answers
    assert abs(acc - chance) < 4 * np.sqrt(chance * (1 - chance) / total), (acc, chance)


def test_longer_evaluation_lengths_keep_the_task():
    dm = datamodule("induction-heads", seq_len=4096)
    text = dm.tokenizer.decode(dm.blocks["test"][0]["input_ids"])
    assert len(text) == 4096 and text.count("#") == 2 and text.endswith("#")
    assert dm.fingerprint == datamodule("induction-heads").fingerprint  # same task at another length


def test_bad_task_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match="too short"):
        datamodule("selective-copying", seq_len=8)
    with pytest.raises(ConfigError, match="num_pairs"):
        datamodule("mqar", task={"num_pairs": 20})
