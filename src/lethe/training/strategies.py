"""Lightning's FSDPStrategy, made to run on CPUs too (2 processes over gloo: what the tests train),
with sharded checkpoints that are never half-written.

Lightning refuses FSDP without a GPU, but torch's FSDP runs on CPU tensors once it is told the
device; the state-dict gathers must then not "offload to CPU" (on a CPU module that frees the
parameters FSDP still reads: a segmentation fault in torch 2.13). `auto_wrap_policy` also takes
class paths, so a config can name the residual block (lethe.modules.Block) that each FSDP unit wraps.
A validate or test after fit reuses fit's FSDP wrapper (wrapping the sharded parameters again
would shard the shards).

Checkpoints: with state_dict_type=full Lightning gathers the state on rank 0 and writes it through
the Trainer's CheckpointIO (lethe's AtomicCheckpointIO: a temporary file renamed over the old).
With state_dict_type=sharded Lightning bypasses CheckpointIO and writes every rank's shard into
the checkpoint's directory in place, so a crash mid-save would leave shards of two steps under
one name. Here the shards (torch.distributed.checkpoint) and meta.pt (the rest, the `lethe` entry
included) go to a temporary directory beside it, which then replaces the old one whole
(lethe.files.replace_directory); read_checkpoint reads such a directory like a .ckpt file.
"""

import glob
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from hydra.utils import get_class
from lightning.fabric.strategies import model_parallel as fabric_model_parallel
from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _distributed_checkpoint_save, _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies import fsdp as pytorch_fsdp

from lethe.errors import ConfigError, first_line
from lethe.files import replace_directory

# torch 2.13's FSDP (version 1, which Lightning's strategy wraps) about its own internals, on every
# save: deprecations a user of trainer=fsdp can do nothing about
for _message in (r"Please use DTensor instead and we are deprecating ShardedTensor",
                 r"FSDP\.state_dict_type\(\) and FSDP\.set_state_dict_type",
                 r"Multiple backends are registered with this ProcessGroup", r"`_get_pg_default_device` will be deprecated"):
    warnings.filterwarnings("ignore", message=_message)


def module_classes(names) -> set[type]:
    """{class} of each import path ("lethe.modules.Block"); a one-line error for a wrong one."""
    classes = set()
    for name in names:
        try:
            classes.add(get_class(name) if isinstance(name, str) else name)
        except Exception as exc:
            raise ConfigError(f"trainer.strategy.auto_wrap_policy names {name!r}, which is not a class ({first_line(exc)}); "
                              "name the layer class, e.g. [lethe.modules.Block]") from None
    return classes


def _full_state_dict_context_without_offload(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


class FSDPStrategy(LightningFSDPStrategy):
    def __init__(self, *args, auto_wrap_policy=None, **kwargs):
        if auto_wrap_policy is not None and not callable(auto_wrap_policy):  # a YAML list of class paths (or a set of classes)
            auto_wrap_policy = module_classes(auto_wrap_policy)
        super().__init__(*args, auto_wrap_policy=auto_wrap_policy, **kwargs)

    @contextmanager
    def _state_dict_gathers_on_cpu(self):
        """Full state dicts gathered without offloading (the parameters are on the CPU already)."""
        if self.root_device.type != "cpu":
            yield
            return
        context = _full_state_dict_context_without_offload
        # Lightning's FSDPStrategy and the full-checkpoint loader it calls (_load_raw_module_state)
        with (mock.patch.object(pytorch_fsdp, "_get_full_state_dict_context", context),
              mock.patch.object(fabric_model_parallel, "_get_full_state_dict_context", context)):
            yield

    def _setup_model(self, model):
        wrapped = getattr(self, "_wrapped", None)
        if wrapped is not None and wrapped.module is model:
            # validate/test after fit: the module's parameters are that wrapper's shards now, and
            # wrapping them again would shard the shards (a size mismatch on loading best.ckpt)
            return wrapped
        if self.root_device.type != "cpu":
            self._wrapped = super()._setup_model(model)
            return self._wrapped
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Lightning passes device_id=root_device.index, None on a CPU, and FSDP then looks for an accelerator
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        self._wrapped = model
        return model

    def lightning_module_state_dict(self):
        with self._state_dict_gathers_on_cpu():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with self._state_dict_gathers_on_cpu():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        with self._state_dict_gathers_on_cpu():
            return super().load_checkpoint(checkpoint_path, weights_only)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # full: through AtomicCheckpointIO
        if storage_options is not None:
            raise TypeError("FSDPStrategy.save_checkpoint(..., storage_options=...) is not supported")
        path = Path(self.broadcast(filepath))
        tmp = None
        if self.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # what a crash mid-save left
                shutil.rmtree(stale, ignore_errors=True)
            tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(self.broadcast(tmp))
        state = {"model": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(state, tmp)  # every rank its shard; rank 0 the index (.metadata) once all are written
        if self.is_global_zero:
            torch.save(checkpoint, tmp / _METADATA_FILENAME)
            replace_directory(tmp, path)
        self.barrier("lethe.sharded_checkpoint")
