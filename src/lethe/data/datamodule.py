"""LMDataModule: corpus -> tokenizer -> cached token streams -> batches of blocks.

Training reads an endless, seeded, resumable stream of shuffled block indices: epoch e is a fixed
permutation seeded by (seed, e), the global stream is epoch 0 then 1 then ..., and `samples_seen`
is the position in it. Under DDP rank r takes global positions samples_seen + r, + r + world_size,
... so the union over ranks is the same global order for any world size, and a run resumed from
`state_dict()` sees exactly the batches it would have seen. Validation/test read every block of
their split once, in order, each rank a contiguous shard (no padding, no duplicates).
"""

import hashlib
import logging
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lethe.data.cache import TokenBlocks, build_cache, cache_path, load_cache
from lethe.data.corpus import SPLITS
from lethe.data.fingerprint import digest
from lethe.data.sources import open_corpus
from lethe.data.tokenizer import build_tokenizer, tokenizer_fingerprint
from lethe.errors import ConfigError, DataError, require, require_int

log = logging.getLogger(__name__)


def rank_and_world_size(rank=None, world_size=None) -> tuple[int, int]:
    """This process's rank and the world size: the given ones, else torch.distributed's (0, 1
    outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        found = 0, 1
    return (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (uint64 arithmetic wraps), so the shuffle below depends on nothing
    but (seed, epoch): not on numpy's or torch's RNG implementations."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    salt = np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest(), "little"))
    return np.argsort(_splitmix64(np.arange(num_blocks, dtype=np.uint64) ^ salt), kind="stable")


class BlockStream(Sampler):
    """Endless stream of block indices for one rank, starting at global position start()."""

    def __init__(self, num_blocks: int, seed: int, start=lambda: 0, on_advance=None, rank=None, world_size=None):
        self.num_blocks, self.seed, self.start, self.on_advance = num_blocks, seed, start, on_advance
        self.rank, self.world_size = rank, world_size  # None: ask torch.distributed when iterated
        self._epoch, self._perm = None, None

    def global_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, block_permutation(self.num_blocks, self.seed, epoch)
        return int(self._perm[offset])

    def __iter__(self):
        rank, world = rank_and_world_size(self.rank, self.world_size)
        position = self.start() + rank
        while True:
            index = self.global_index(position)
            position += world
            if self.on_advance is not None:
                self.on_advance(position - rank)  # global samples handed out, this round included
            yield index


class EvalShard(Sampler):
    """Blocks of an evaluation split for one rank: a contiguous slice, in order."""

    def __init__(self, num_blocks: int, rank=None, world_size=None):
        self.num_blocks, self.rank, self.world_size = num_blocks, rank, world_size

    def _indices(self) -> range:
        rank, world = rank_and_world_size(self.rank, self.world_size)
        return range(rank * self.num_blocks // world, (rank + 1) * self.num_blocks // world)

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())


def _plain(node):
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return dict(node)


def cross_document_setting(data_cfg) -> bool | None:
    """A data config's data.cross_document: None for data without documents to pack (the
    synthetic tasks), true for an LMDataModule config written before the switch existed (its
    blocks ran across documents), else the value."""
    data_cfg = data_cfg or {}
    if not str(data_cfg.get("_target_", "")).endswith("LMDataModule"):
        return None
    return data_cfg.get("cross_document", True)


class LMDataModule(L.LightningDataModule):
    def __init__(self, source: dict, tokenizer: dict, seq_len: int, batch_size: int = 8, eval_batch_size=None,
                 num_workers: int = 0, num_proc=None, cache_dir="data", seed: int = 0, undecodable: str = "skip",
                 max_tokens=None, cross_document: bool = False):
        """source: the corpus spec (`_target_` a corpus function, lethe.data.sources); tokenizer:
        the tokenizer spec (`_target_` a builder, lethe.data.tokenizer); num_proc: datasets.map worker processes for tokenization (None:
        min(4, cpu count)); undecodable: skip or error on non-UTF-8 local data; max_tokens: cap on
        each split's token stream (an int, or {train, val, test: int | null}); cross_document:
        false gives every block its document starts (batch["document_starts"]), where the model
        resets, true lets a block's context run across the documents packed into it."""
        super().__init__()
        self.source_spec, self.tokenizer_spec = _plain(source), _plain(tokenizer)
        for key, value in (("seq_len", seq_len), ("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size or 1)):
            require_int(key, value)
        require(undecodable in ("skip", "error"), "data.undecodable", undecodable, "skip or error")
        require(isinstance(cross_document, bool), "data.cross_document", cross_document,
                "false (reset at every document start) or true (context crosses documents)")
        self.cross_document = cross_document
        caps = _plain(max_tokens) if isinstance(max_tokens, dict) or hasattr(max_tokens, "keys") else {s: max_tokens for s in SPLITS}
        if set(caps) - set(SPLITS) or any(v is not None and (not isinstance(v, int) or v < 1) for v in caps.values()):
            raise ConfigError(f"data.max_tokens={max_tokens!r}; use a positive int or {{train, val, test: int or null}}")
        self.max_tokens = {s: caps.get(s) for s in SPLITS}
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed, self.undecodable = num_workers, seed, undecodable
        self.num_proc = num_proc or min(4, os.cpu_count() or 1)
        self.cache_dir = os.path.abspath(os.path.expanduser(str(cache_dir)))
        self.samples_seen = 0  # global training samples consumed: the resume position
        self.tokenizer = self.fingerprint = self.corpus = None
        self.caches, self.blocks, self.token_counts = {}, {}, {}

    # ---- building (prepare_data: once per node; setup: every process; both idempotent) ----------
    def prepare_data(self):
        self._build()

    def setup(self, stage=None):
        self._build()
        if self.blocks:
            return
        for split in SPLITS:
            blocks = TokenBlocks(self.caches[split], self.seq_len, document_starts=not self.cross_document)
            if len(blocks) == 0:
                more = "more documents" + ("" if split == "train" else f", or a larger data.source.holdout.{split} if the split is carved")
                raise DataError(f"split '{split}' has {self.caches[split].num_tokens} tokens but one block needs "
                                f"seq_len+1 = {self.seq_len + 1}; lower seq_len or add data ({more})")
            self.blocks[split] = blocks
        log.info("data: %s, fingerprint %s, vocab %d; tokens %s; blocks of %d: %s; %s", self.corpus.name, self.fingerprint,
                 self.vocab_size, self.token_counts, self.seq_len, {s: len(b) for s, b in self.blocks.items()},
                 "context crosses documents" if self.cross_document else "state resets at every document start")

    def _build(self):
        if self.caches:
            return
        corpus = open_corpus(self.source_spec, self.cache_dir, self.undecodable)
        tokenizer = build_tokenizer(self.tokenizer_spec, self.cache_dir, corpus)
        tokenizer_fp = tokenizer_fingerprint(tokenizer)
        caches = {}
        for split in SPLITS:
            path = cache_path(self.cache_dir, corpus.fingerprint, split, tokenizer_fp, self.max_tokens[split])
            caches[split] = load_cache(path)
            if caches[split] is None:
                meta = {"split": split, "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
                        "tokenizer_fingerprint": tokenizer_fp, "source": self.source_spec, "tokenizer": self.tokenizer_spec}
                caches[split] = build_cache(corpus.load()[split], tokenizer, path, meta, self.num_proc, self.max_tokens[split])
        if not any(c.num_documents for c in caches.values()):
            raise DataError(f"corpus {corpus.name} is empty: no document has any text; point data.source at non-empty data")
        capped = any(v is not None for v in self.max_tokens.values())
        self.fingerprint = corpus.fingerprint + (f"-max{digest(self.max_tokens, size=4)}" if capped else "")
        self.corpus, self.tokenizer, self.caches = corpus, tokenizer, caches
        self.token_counts = {s: c.num_tokens for s, c in caches.items()}

    # ---- facts ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def num_blocks(self, split: str) -> int:
        return len(self._blocks(split))

    def _blocks(self, split: str) -> TokenBlocks:
        if split not in self.blocks:
            raise RuntimeError(f"LMDataModule: call setup() before asking for split '{split}' (splits: {', '.join(SPLITS)})")
        return self.blocks[split]

    # ---- loaders --------------------------------------------------------------------------
    def train_dataloader(self):
        blocks = self._blocks("train")
        stream = BlockStream(len(blocks), self.seed, start=lambda: self.samples_seen, on_advance=self._stream_advanced)
        return DataLoader(blocks, batch_size=self.batch_size, sampler=stream, drop_last=True,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def eval_dataloader(self, split: str):
        """Every block of `split` (train, val or test) once, in order, sharded by rank."""
        blocks = self._blocks(split)
        return DataLoader(blocks, batch_size=self.eval_batch_size, sampler=EvalShard(len(blocks)), shuffle=False,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        return self.eval_dataloader("val")

    def test_dataloader(self):
        return self.eval_dataloader("test")

    # ---- resume position ------------------------------------------------------------------
    # Without a Trainer (plain iteration, num_workers=0) an index handed out is a sample consumed.
    # Under a Trainer, Lightning fetches a batch ahead and workers prefetch more, so the position
    # advances only when Lightning actually moves a training batch to the device.
    def _stream_advanced(self, position: int):
        if self.trainer is None:
            self.samples_seen = position

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.samples_seen += len(batch["input_ids"]) * self.trainer.world_size
        return batch

    def state_dict(self) -> dict:
        return {"samples_seen": int(self.samples_seen)}

    def load_state_dict(self, state: dict):
        self.samples_seen = int(state["samples_seen"])
