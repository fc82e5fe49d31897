"""Hybrid language models: any stack of Mamba-2, Mamba, attention and MLP layers, one letter per
layer, as in Megatron-LM's hybrid layer pattern:

    M  Mamba-2 mixer    m  Mamba mixer    *  causal RoPE attention (optionally sliding-window)    -  SwiGLU MLP

"MMMMMM*MMMMM" is a Mamba-2 stack with one attention layer in twelve (NVIDIA's Mamba-2-Hybrid
recipe spreads about 8% attention evenly); "m-*-" is Samba's unit (Mamba, MLP, sliding-window
attention, MLP). Every letter is one pre-norm residual block, h <- h + layer(norm(h)), between
the shared embedding and the final norm with the tied head (lethe.models.lm). The settings of
each layer type are given once (`mamba`, `mamba2`, `attention`, `mlp`) and go to the same layer
builders the pure models use, so an `m` layer here is a MambaLM layer, a `*` a TransformerLM one.
"""

from collections.abc import Mapping, Sequence

from lethe.errors import ConfigError, require_int
from lethe.models.lm import LanguageModel, constructor_args, layer_keys, plain
from lethe.models.mamba import mamba_mixer
from lethe.models.mamba2 import mamba2_mixer
from lethe.models.transformer import attention_mixer, swiglu_mlp
from lethe.modules import Block, CausalSelfAttention, Mamba2Mixer, MambaMixer, SwiGLU

# letter -> (its settings key, its builder, the layer class whose keywords are its settings)
LAYER_TYPES = {
    "M": ("mamba2", mamba2_mixer, Mamba2Mixer),
    "m": ("mamba", mamba_mixer, MambaMixer),
    "*": ("attention", attention_mixer, CausalSelfAttention),
    "-": ("mlp", swiglu_mlp, SwiGLU),
}
LETTER_BY_NAME = {key: letter for letter, (key, _, _) in LAYER_TYPES.items()}
VALID_LETTERS = ", ".join(f"{letter} ({cls.kind})" for letter, (_, _, cls) in LAYER_TYPES.items())


def parse_pattern(pattern) -> str:
    """The pattern as a string of layer letters, from a string ("MM*M") or a list of letters or
    type names (["M", "attention", "mlp"]); a ConfigError names what is wrong and the valid letters."""
    if isinstance(pattern, Sequence) and not isinstance(pattern, str):
        for index, entry in enumerate(pattern):
            if entry not in LAYER_TYPES and entry not in LETTER_BY_NAME:
                raise ConfigError(f"model.pattern[{index}]={entry!r} is not a layer type; give one of {VALID_LETTERS} "
                                  f"or its name ({', '.join(LETTER_BY_NAME)})")
        pattern = "".join(LETTER_BY_NAME.get(entry, entry) for entry in pattern)
    if not isinstance(pattern, str):
        raise ConfigError(f"model.pattern={pattern!r} must be a string of layer letters, e.g. MM*M, or a list of them")
    if not pattern:
        raise ConfigError(f"model.pattern is empty: give one letter per layer, e.g. MM*M; the letters are {VALID_LETTERS}")
    for index, letter in enumerate(pattern):
        if letter not in LAYER_TYPES:
            raise ConfigError(f"model.pattern={pattern} has {letter!r} at layer {index}, not a layer type; "
                              f"the letters are {VALID_LETTERS}")
    return pattern


def _check_settings(key: str, layer_cls, settings) -> dict:
    if not isinstance(settings, Mapping):
        raise ConfigError(f"model.{key}={settings!r} must be a mapping of settings, e.g. {{}} for the defaults")
    known = layer_keys(layer_cls)
    for name in settings:
        if name not in known:
            raise ConfigError(f"model.{key}.{name} is not a setting of the {key} layers; they take {', '.join(known)}")
    return dict(settings)


class HybridLM(LanguageModel):
    # every layer is one residual block: mixers and MLPs each write into the stream once
    residual_projections = ("out_proj.weight", "o_proj.weight", "down_proj.weight")
    n_residuals_per_layer = 1

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        pattern: str | list[str],
        mamba2: dict | None = None,
        mamba: dict | None = None,
        attention: dict | None = None,
        mlp: dict | None = None,
        max_seq_len: int | None = None,
        norm_eps: float = 1e-5,
        pad_vocab_multiple: int = 8,
        residual_in_fp32: bool = True,
    ):
        pattern = parse_pattern(plain(pattern))
        mamba2, mamba, attention, mlp = (plain(s) if s is not None else {} for s in (mamba2, mamba, attention, mlp))
        config = constructor_args(locals())
        self.validate_common(vocab_size, d_model, len(pattern), norm_eps, pad_vocab_multiple)
        if max_seq_len is not None:
            require_int("model.max_seq_len", max_seq_len)
        settings = {key: _check_settings(key, layer_cls, config[key]) for key, _, layer_cls in LAYER_TYPES.values()}
        settings["mamba2"].setdefault("norm_eps", norm_eps)  # its gated norm, as in Mamba2LM
        if settings["attention"].get("window") is not None and "*" not in pattern:
            raise ConfigError(f"model.attention.window={settings['attention']['window']} is set but model.pattern={pattern} "
                              "has no attention layer (*); add one or set model.attention.window=null")
        self.pattern = pattern
        blocks = []
        for letter in pattern:
            key, builder, _ = LAYER_TYPES[letter]
            layer = builder(d_model, prefix=f"model.{key}", **settings[key])
            blocks.append(Block(d_model, layer, norm_eps=norm_eps, residual_in_fp32=residual_in_fp32))
        super().__init__(config, blocks, vocab_size, d_model, norm_eps, pad_vocab_multiple, max_seq_len=max_seq_len)
