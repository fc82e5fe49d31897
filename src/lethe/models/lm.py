"""What Mamba and the Transformer++ share: token embedding, a stack of residual blocks, final
RMSNorm, and an LM head tied to the embedding. Subclasses only build the blocks.

Init follows mamba_ssm's `_init_weights` (itself GPT-2's): embeddings N(0, 0.02), Linear biases
zero (except those marked `_no_reinit`, e.g. Mamba's dt bias), Linear weights PyTorch's
kaiming-uniform default, and every projection that writes into the residual stream re-drawn
and divided by sqrt(n_residuals_per_layer * n_layer) so the stream's variance does not grow
with depth.
"""

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lethe.errors import ConfigError, require_int, require_positive
from lethe.modules import RMSNorm


def constructor_args(frame_locals: dict) -> dict:
    """The constructor's arguments from its locals(), for `model.config` (checkpoint metadata)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


def plain(value):
    """Mappings and lists (OmegaConf's included) as plain dicts and lists, recursively: checkpoints
    record plain values, so init_from and resume compare configs equal and pickle no OmegaConf object."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def layer_keys(layer_cls) -> list[str]:
    """The settings a layer class takes besides d_model (MambaMixer: d_state, d_conv, ...)."""
    return [name for name in inspect.signature(layer_cls).parameters if name != "d_model"]


def layer_settings(layer_cls, config: dict) -> dict:
    """The entries of a model's config that a layer class takes."""
    keys = layer_keys(layer_cls)
    return {k: v for k, v in config.items() if k in keys}


def layer_args(layer_cls, settings: dict) -> dict:
    """Every setting `layer_cls(d_model, ...)` runs with: `settings` over the class's defaults (a
    required one it lacks stays missing, for the builder's check to name)."""
    defaults = {name: p.default for name, p in inspect.signature(layer_cls).parameters.items()
                if name != "d_model" and p.default is not inspect.Parameter.empty}
    return {**defaults, **settings}


def model_target(model) -> str:
    """The import path of a model's class where it is defined ("lethe.models.mamba.MambaLM"):
    what checkpoints record and compare; configs may name the class by its public path
    (lethe.models.MambaLM) and compare classes, not strings."""
    cls = model if isinstance(model, type) else type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


class LanguageModel(nn.Module):
    # names of the weights that write into the residual stream, and how many per layer
    residual_projections: tuple[str, ...] = ()
    n_residuals_per_layer: int = 1

    def __init__(
        self,
        config: dict,
        blocks: list[nn.Module],
        vocab_size: int,
        d_model: int,
        norm_eps: float = 1e-5,
        pad_vocab_multiple: int = 8,
        max_seq_len: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        # A multiple of 8 keeps the LM-head matmul on fast tensor-core tiles; the padded rows are
        # never targets, so training pushes their logits down.
        self.padded_vocab_size = math.ceil(vocab_size / pad_vocab_multiple) * pad_vocab_multiple
        self.max_seq_len = max_seq_len

        self.embedding = nn.Embedding(self.padded_vocab_size, d_model)
        self.layers = nn.ModuleList(blocks)
        self.norm_f = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, self.padded_vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied
        self._init_weights()
        # what num_params counts once FSDP has flattened the parameters into 1-d shards
        self._built_counts = (self._count(self.parameters()), self.embedding.weight.numel())

    @staticmethod
    def validate_common(vocab_size, d_model, n_layer, norm_eps, pad_vocab_multiple):
        require_int("model.vocab_size", vocab_size)
        require_int("model.d_model", d_model)
        require_int("model.n_layer", n_layer)
        require_positive("model.norm_eps", norm_eps)
        require_int("model.pad_vocab_multiple", pad_vocab_multiple)

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embedding.weight, std=0.02)
        scale = math.sqrt(self.n_residuals_per_layer * len(self.layers))
        for name, p in self.named_parameters():
            if name.endswith(self.residual_projections):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # nn.Linear's default draw
                with torch.no_grad():
                    p.div_(scale)

    def forward(self, input_ids, states: list | None = None, document_starts=None):
        """input_ids (batch, length) -> logits (batch, length, padded_vocab_size), float32.

        With `states` (from `empty_states`), the tokens continue the sequence those states hold
        and the states advance past them: call it once with the prompt (prefill), then with one
        token at a time (decoding). With `document_starts` (batch, length) bool, true where a
        packed document starts, every layer resets there: no document sees another.
        """
        if states is None:
            self.check_length(input_ids.shape[1], "input length", "raise model.max_seq_len or lower seq_len")
        if document_starts is not None and document_starts.shape != input_ids.shape:
            raise ValueError(f"document_starts has shape {tuple(document_starts.shape)}, input_ids {tuple(input_ids.shape)}")
        h = self.embedding(input_ids)
        for layer, state in zip(self.layers, states or [None] * len(self.layers)):
            h = layer(h, state, document_starts)
        return self.lm_head(self.norm_f(h)).float()

    def check_length(self, length: int, what: str, fix: str) -> None:
        """The one guard on sequence length: a model with a max_seq_len refuses longer inputs."""
        if self.max_seq_len is not None and length > self.max_seq_len:
            raise ConfigError(f"{what} {length} exceeds model.max_seq_len={self.max_seq_len}; {fix}")

    def empty_states(self, batch_size: int, max_length: int) -> list:
        """Per-layer decoding states for sequences of up to max_length tokens in all."""
        self.check_length(max_length, "decoding (prompt + new tokens)", "shorten the prompt or max_new_tokens")
        return [layer.mixer.empty_state(batch_size, max_length) for layer in self.layers]

    def describe_layers(self) -> list[str]:
        """The stack, one line per run of identical layers: "layers 0-5  Mamba-2 (d_state 128, ...)"."""
        runs: list[list] = []  # [first, last, text]
        for index, layer in enumerate(self.layers):
            text = " + ".join(f"{m.kind} ({m.extra_repr()})" for m in (layer.mixer, layer.mlp) if m is not None)
            if runs and runs[-1][2] == text:
                runs[-1][1] = index
            else:
                runs.append([index, index, text])
        return [f"{f'layer {a}' if a == b else f'layers {a}-{b}':<13}{text}" for a, b, text in runs]

    @staticmethod
    def _count(params) -> int:
        return sum(p.numel() for p in params)  # parameters() yields tied ones once

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters, tied embedding/head counted once; optionally without the embedding. Under
        FSDP (trainer=fsdp) each rank holds shards: the counts are then those the model was built with."""
        params = list(self.parameters())
        if any(getattr(p, "_fsdp_flattened", False) for p in params):
            total, embedding = self._built_counts
        else:
            total, embedding = self._count(params), self.embedding.weight.numel()
        return total - embedding if exclude_embedding else total

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices (and the embedding); never decay biases, norm weights, or
        SSM parameters marked `_no_weight_decay` (A_log, D, constant B/C)."""
        decay, no_decay = [], []
        for p in self.parameters():
            skip = p.ndim < 2 or getattr(p, "_no_weight_decay", False)
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
