"""The order of training data: seeded per-epoch permutations, an exact resume position, DDP shards
that interleave to the single-process stream, evaluation shards, and what Lightning consumed."""

import numpy as np
import pytest
import torch

from helpers import local_dm
from lethe.data import BlockStream, EvalShard, block_permutation


def test_block_permutations_are_seeded_per_epoch():
    p = block_permutation(1000, seed=3, epoch=0)
    assert sorted(p.tolist()) == list(range(1000))
    assert np.array_equal(p, block_permutation(1000, seed=3, epoch=0))
    assert not np.array_equal(p, block_permutation(1000, seed=3, epoch=1))
    assert not np.array_equal(p, block_permutation(1000, seed=4, epoch=0))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_stream_resumes_exactly_from_state(tmp_path):
    dm = local_dm(tmp_path, seq_len=8)
    n = dm.num_blocks("train")
    it = iter(dm.train_dataloader())
    take(it, 5)
    state = dm.state_dict()
    assert state == {"samples_seen": 5 * 4}
    expected = take(it, (2 * n) // 4)  # runs across epoch boundaries
    fresh = local_dm(tmp_path, seq_len=8)
    fresh.load_state_dict(state)
    resumed = take(iter(fresh.train_dataloader()), len(expected))
    for a, b in zip(expected, resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # every epoch visits every block once
    stream = BlockStream(n, seed=0)
    assert sorted(stream.global_index(p) for p in range(n, 2 * n)) == list(range(n))


@pytest.mark.parametrize("start", [0, 6])
def test_ddp_shards_interleave_to_the_single_process_stream(start):
    single = iter(BlockStream(37, seed=1, start=lambda: start, rank=0, world_size=1))
    ranks = [iter(BlockStream(37, seed=1, start=lambda: start, rank=r, world_size=2)) for r in range(2)]
    interleaved = [i for pair in zip(take(ranks[0], 50), take(ranks[1], 50)) for i in pair]
    assert interleaved == take(single, 100)


def test_eval_shards_cover_every_block_once_in_order():
    for world in (1, 2, 3, 4):
        shards = [list(EvalShard(10, rank=r, world_size=world)) for r in range(world)]
        assert sum(shards, []) == list(range(10))
        assert [len(EvalShard(10, rank=r, world_size=world)) for r in range(world)] == [len(s) for s in shards]


def test_samples_seen_counts_batches_lightning_consumed(tmp_path):
    """Lightning fetches a batch ahead; the resume position must count only consumed batches."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(steps, dm):
        module = Recorder()
        L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  use_distributed_sampler=False).fit(module, datamodule=dm)
        return module.seen

    full = fit(5, local_dm(tmp_path, seq_len=8))
    first = local_dm(tmp_path, seq_len=8)
    fit(2, first)
    assert first.state_dict() == {"samples_seen": 2 * 4}
    resumed = local_dm(tmp_path, seq_len=8)
    resumed.load_state_dict(first.state_dict())
    rest = fit(3, resumed)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a, b)
