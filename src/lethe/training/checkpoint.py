"""Checkpoints that are never half-written, and loading a trained model back from one.

Every checkpoint is self-contained: besides Lightning's state it carries the model's class and
constructor arguments, the tokenizer's files and the corpus fingerprint, so evaluation needs
nothing but the file.
"""

import importlib
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lethe.errors import LetheError, first_line
from lethe.files import atomic_path
from lethe.models import model_target

FORMAT_VERSION = 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same directory, fsync, then rename over it (lethe.files).

    A crash or a full disk mid-save leaves the previous checkpoint intact, never a torn file.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        # to a path, not a Python file object: torch writes it in C++, untouched by signal handlers
        with atomic_path(path, fsync=True) as tmp:
            torch.save(checkpoint, tmp)


def read_checkpoint(path) -> dict:
    """Load a checkpoint dict, turning the usual failures into one-line errors. A directory is a
    sharded FSDP checkpoint (trainer=fsdp trainer.strategy.state_dict_type=sharded): its shards
    are consolidated into the dict a .ckpt file holds, model weights only (no optimizer state)."""
    path = Path(path)
    if path.is_dir():
        checkpoint = _read_sharded(path)
    elif not path.is_file():
        raise LetheError(f"checkpoint {path} does not exist; pass the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a truncated or foreign file
            raise LetheError(f"checkpoint {path} could not be read ({type(exc).__name__}); "
                             "it is corrupt or not a Lethe checkpoint") from None
    meta = checkpoint.get("lethe") if isinstance(checkpoint, dict) else None
    if meta is None:
        raise LetheError(f"checkpoint {path} has no Lethe metadata; it was not written by lethe's train.py")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LetheError(
            f"checkpoint {path} has format version {meta.get('format_version')}, this Lethe reads {FORMAT_VERSION}; "
            "evaluate it with the Lethe version that wrote it"
        )
    return checkpoint


SHARDED_FILES = ("meta.pt", ".metadata")  # Lightning's (all but the weights) and torch.distributed.checkpoint's index


def _read_sharded(path: Path) -> dict:
    """A sharded checkpoint directory as a checkpoint dict: meta.pt plus the model weights
    gathered from every rank's shard, in this one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    missing = [name for name in SHARDED_FILES if not (path / name).is_file()]
    if missing:
        raise LetheError(f"checkpoint {path} is a directory without {' or '.join(missing)}; it is not a sharded "
                         "checkpoint written by trainer=fsdp (pass a .ckpt file or a complete sharded checkpoint directory)")
    try:
        checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        weights = {}
        # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, for the weights alone
        _load_state_dict(weights, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys={"model"}),
                         no_dist=True)
    except Exception as exc:
        raise LetheError(f"sharded checkpoint {path} could not be read ({type(exc).__name__}: {first_line(exc, 150)}); "
                         "a shard is missing or corrupt") from None
    if not isinstance(checkpoint, dict) or "model" not in weights:
        raise LetheError(f"sharded checkpoint {path} holds no model weights; it is not a Lethe checkpoint")
    checkpoint["state_dict"] = weights["model"]
    return checkpoint


def build_model(meta: dict):
    """Instantiate the model class recorded in checkpoint metadata with its constructor arguments."""
    module_name, _, class_name = meta["model_target"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    return model_class(**meta["model_config"])


def tokenizer_files(tokenizer) -> dict:
    """The tokenizer's `save_pretrained` files as {name: bytes}, to embed in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict):
    """Rebuild a tokenizer from `tokenizer_files` output (no config or network needed)."""
    from lethe.data import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        return load_tokenizer(tmp)


def checkpoint_metadata(model, tokenizer_files: dict, corpus_fingerprint=None, run_config=None, source=None) -> dict:
    """The `lethe` entry of every checkpoint: what `load_trained_model` and eval need.

    corpus_fingerprint and run_config exist only for checkpoints written by a training run;
    `source` says where imported weights came from (None for trained ones).
    """
    return {
        "format_version": FORMAT_VERSION,
        "model_target": model_target(model),
        "model_config": model.config,
        "num_params": model.num_params(),
        "tokenizer_files": tokenizer_files,
        "corpus_fingerprint": corpus_fingerprint,
        "run_config": run_config,
        "source": source,
    }


def save_model_checkpoint(model, tokenizer, path, source: dict) -> None:
    """Write a weights-only checkpoint (no optimizer or loop state) that `load_trained_model`
    reads like a trained one; the keys follow LanguageModelTask's ("model." + parameter name)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"state_dict": state, "lethe": checkpoint_metadata(model, tokenizer_files(tokenizer), source=source)}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


def model_state(checkpoint: dict) -> dict:
    """The model's own state dict from a checkpoint's (LanguageModelTask prefixes "model.")."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_trained_model(path):
    """(model in eval mode with trained weights, tokenizer, metadata) from a checkpoint file."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint["lethe"]
    model = build_model(meta)
    model.load_state_dict(model_state(checkpoint))
    return model.eval(), tokenizer_from_files(meta["tokenizer_files"]), meta
