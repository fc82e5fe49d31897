"""Lethe checkpoints <-> Hugging Face `transformers` directories.

    MambaLM        <-> MambaForCausalLM   (model_type "mamba"; the state-spaces/mamba-*-hf layout)
    Mamba2LM       <-> Mamba2ForCausalLM  (model_type "mamba2": mixer-only blocks, D per head, norm(y * silu(z)))
    TransformerLM  <-> LlamaForCausalLM   (model_type "llama": RoPE rotate-half, SwiGLU, RMSNorm)

An exported directory holds config.json, model.safetensors and the tokenizer's files, so
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it.
An imported directory becomes a self-contained Lethe checkpoint that `load_trained_model`, eval.py
and `train.py init_from=` read. The two architectures compute the same functions as their HF
counterparts, so the mapping is only names, two fused matrices, and config fields; anything the
other side cannot represent is refused in one line rather than approximated.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaConfig, Mamba2Config, MambaConfig

from lethe.data import load_tokenizer
from lethe.errors import LetheError, first_line
from lethe.files import atomic_directory
from lethe.models import HybridLM, Mamba2LM, MambaLM, TransformerLM, model_target
from lethe.models.transformer import default_d_ff
from lethe.modules.mamba import resolve_dt_rank
from lethe.training.checkpoint import build_model, load_trained_model, save_model_checkpoint

MAMBA_TARGET, MAMBA2_TARGET, TRANSFORMER_TARGET = model_target(MambaLM), model_target(Mamba2LM), model_target(TransformerLM)


# ---- parameter names: one Lethe parameter -> the HF tensor(s) it is made of ------------------
# Lethe fuses q/k/v (stacked along the output dim, see modules/attention.py) and gate/up (gate
# first, see modules/mlp.py); HF keeps them apart. A fused Lethe weight is the HF pieces
# concatenated along dim 0, in the listed order, each piece the same size.
LLAMA_LAYER = {
    "norm.weight": ["input_layernorm.weight"],
    "norm2.weight": ["post_attention_layernorm.weight"],
    "mixer.qkv_proj.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "mixer.o_proj.weight": ["self_attn.o_proj.weight"],
    "mlp.gate_up_proj.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.down_proj.weight": ["mlp.down_proj.weight"],
}


def mamba_hf_names(name: str) -> list[str]:
    # HF's Mamba and Mamba-2 mixers use Lethe's (i.e. mamba_ssm's) names; only the embedding is plural.
    return ["backbone.embeddings.weight"] if name == "embedding.weight" else [f"backbone.{name}"]


def llama_hf_names(name: str) -> list[str]:
    if name == "embedding.weight":
        return ["model.embed_tokens.weight"]
    if name == "norm_f.weight":
        return ["model.norm.weight"]
    _, layer, rest = name.split(".", 2)  # layers.{i}.<rest>
    if rest not in LLAMA_LAYER:
        raise LetheError(f"TransformerLM parameter {name} has no Llama counterpart")
    return [f"model.layers.{layer}.{piece}" for piece in LLAMA_LAYER[rest]]


HF_NAMES = {MAMBA_TARGET: mamba_hf_names, MAMBA2_TARGET: mamba_hf_names, TRANSFORMER_TARGET: llama_hf_names}


def parameters(model) -> dict:
    """name -> tensor for each parameter once: the tied LM head appears as embedding.weight only."""
    return {name: p.detach() for name, p in model.named_parameters()}


def to_hf_state(model, target: str) -> dict:
    state = {}
    for name, tensor in parameters(model).items():
        hf_names = HF_NAMES[target](name)
        if len(hf_names) == 1:
            state[hf_names[0]] = tensor.contiguous()
            continue
        # cloned: safetensors refuses tensors that share storage, and chunks of one weight do
        for hf_name, piece in zip(hf_names, tensor.chunk(len(hf_names), dim=0)):
            state[hf_name] = piece.clone()
    return state


def from_hf_state(model, target: str, hf_state: dict, where: str) -> None:
    """Load HF tensors into `model` strictly: every parameter found, every HF tensor used."""
    unused = dict(hf_state)
    loaded = {}
    for name, param in parameters(model).items():
        pieces = []
        for hf_name in HF_NAMES[target](name):
            if hf_name not in unused:
                raise LetheError(f"{where} has no weight {hf_name} (needed for Lethe's {name}); the weights are incomplete")
            pieces.append(unused.pop(hf_name))
        tensor = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        if tensor.shape != param.shape:
            raise LetheError(f"{where}: weight {' + '.join(HF_NAMES[target](name))} has shape {tuple(tensor.shape)}, "
                             f"its config implies {tuple(param.shape)}")
        loaded[name] = tensor
    if unused:
        raise LetheError(f"{where} has weight {sorted(unused)[0]} that the Lethe model has no place for "
                         f"({len(unused)} unexpected in all)")
    # Every parameter is in `loaded`; strict=False only lets buffers and the tied head keep their own.
    model.load_state_dict(loaded, strict=False)


# ---- config: Lethe constructor arguments <-> transformers config ------------------------------
def special_token_ids(tokenizer) -> dict:
    # None where the tokenizer has no such token (HF's Mamba default 0 would name a real token)
    return {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad")}


def hf_config(model, target: str, tokenizer):
    c = model.config
    common = dict(vocab_size=model.padded_vocab_size, hidden_size=c["d_model"], num_hidden_layers=c["n_layer"],
                  hidden_act="silu", tie_word_embeddings=True, **special_token_ids(tokenizer))
    if target == MAMBA_TARGET:
        config = MambaConfig(
            **common, state_size=c["d_state"], expand=c["expand"], conv_kernel=c["d_conv"],
            use_bias=c["bias"], use_conv_bias=c["conv_bias"], time_step_rank=resolve_dt_rank(c["d_model"], c["dt_rank"]),
            time_step_min=float(c["dt_min"]), time_step_max=float(c["dt_max"]), time_step_floor=float(c["dt_init_floor"]),
            layer_norm_epsilon=float(c["norm_eps"]), residual_in_fp32=c["residual_in_fp32"],
        )
        config.architectures = ["MambaForCausalLM"]
    elif target == MAMBA2_TARGET:
        limit = c["dt_limit"]
        config = Mamba2Config(
            **common, num_heads=c["expand"] * c["d_model"] // c["headdim"], head_dim=c["headdim"], n_groups=c["ngroups"],
            state_size=c["d_state"], expand=c["expand"], conv_kernel=c["d_conv"], use_bias=c["bias"],
            use_conv_bias=c["conv_bias"], chunk_size=c["chunk_size"], time_step_rank="auto",  # unused by Mamba-2
            time_step_min=float(c["dt_min"]), time_step_max=float(c["dt_max"]), time_step_floor=float(c["dt_init_floor"]),
            # Lethe's null (no clamp) is the reference's (0, inf): softplus is positive
            time_step_limit=(0.0, math.inf) if limit is None else (float(limit[0]), float(limit[1])),
            layer_norm_epsilon=float(c["norm_eps"]), residual_in_fp32=c["residual_in_fp32"], rescale_prenorm_residual=False,
            # not fields of transformers 5, which always computes norm(y * silu(z)); written as its converter does
            rms_norm=True, norm_before_gate=False,
        )
        config.architectures = ["Mamba2ForCausalLM"]
    else:
        # Llama keeps its residual stream in the compute dtype: in fp32 (the exported dtype) that
        # is exactly Lethe's residual_in_fp32; under bf16 the two round differently.
        config = LlamaConfig(
            **common, num_attention_heads=c["n_head"], num_key_value_heads=c["n_head"],
            head_dim=c["d_model"] // c["n_head"], intermediate_size=c["d_ff"] or default_d_ff(c["d_model"]),
            max_position_embeddings=c["max_seq_len"],
            rope_parameters={"rope_type": "default", "rope_theta": float(c["rope_theta"])},
            rms_norm_eps=float(c["norm_eps"]), attention_bias=False, mlp_bias=False,
        )
        config.architectures = ["LlamaForCausalLM"]
    config.dtype = model.embedding.weight.dtype
    return config


def pad_multiple(vocab_size: int, hf_vocab_size: int) -> int:
    """A pad_vocab_multiple that pads the tokenizer's vocabulary to exactly HF's vocab_size:
    Lethe's default 8 (or a larger power of two) when one fits, else the size itself."""
    return next(m for m in (8, 16, 32, 64, 128, 1, hf_vocab_size) if math.ceil(vocab_size / m) * m == hf_vocab_size)


def lethe_config(cfg, vocab_size: int, where: str) -> tuple[str, dict]:
    """(model_target, constructor arguments) for a transformers config, or a one-line refusal."""
    def refuse(field, value, why):
        raise LetheError(f"{where}: {field}={value!r} is not supported ({why})")

    model_type = getattr(cfg, "model_type", None)
    if model_type not in ("mamba", "mamba2", "llama"):
        refuse("model_type", model_type, "Lethe imports mamba, mamba2 and llama models")
    if cfg.hidden_act != "silu":
        refuse("hidden_act", cfg.hidden_act, "Lethe's models use silu")
    if not cfg.tie_word_embeddings:
        refuse("tie_word_embeddings", False, "Lethe ties the LM head to the embedding")
    if cfg.vocab_size < vocab_size:
        refuse("vocab_size", cfg.vocab_size, f"smaller than the tokenizer's {vocab_size} tokens")
    common = dict(vocab_size=vocab_size, d_model=cfg.hidden_size, n_layer=cfg.num_hidden_layers,
                  pad_vocab_multiple=pad_multiple(vocab_size, cfg.vocab_size))
    if model_type == "mamba":
        if not isinstance(cfg.expand, int) or cfg.intermediate_size != cfg.expand * cfg.hidden_size:
            refuse("expand", cfg.expand, f"Lethe needs an integer, intermediate_size = expand * hidden_size = {cfg.intermediate_size}")
        rank = int(cfg.time_step_rank)
        return MAMBA_TARGET, dict(
            common, d_state=cfg.state_size, d_conv=cfg.conv_kernel, expand=cfg.expand,
            # defaults written as Lethe's configs write them, so `init_from` matches model=mamba-*
            dt_rank="auto" if rank == resolve_dt_rank(cfg.hidden_size, "auto") else rank,
            dt_min=cfg.time_step_min, dt_max=cfg.time_step_max, dt_init_floor=cfg.time_step_floor,
            conv_bias=cfg.use_conv_bias, bias=cfg.use_bias, norm_eps=cfg.layer_norm_epsilon,
            residual_in_fp32=cfg.residual_in_fp32,
        )
    if model_type == "mamba2":
        return MAMBA2_TARGET, mamba2_args(cfg, common, refuse)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        refuse("num_key_value_heads", kv_heads, f"Lethe's attention has as many key/value heads as query heads, {heads}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if head_dim * heads != cfg.hidden_size:
        refuse("head_dim", head_dim, f"Lethe needs head_dim * num_attention_heads = hidden_size = {cfg.hidden_size}")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(cfg, field, False):
            refuse(field, True, "Lethe's Transformer++ has no biases")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters; 4.x keeps them apart
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) != "default" or set(rope) - {"rope_type", "type"}:
        refuse("rope_scaling", rope, "Lethe implements plain RoPE only")
    d_ff = cfg.intermediate_size
    return TRANSFORMER_TARGET, dict(
        common, n_head=heads,
        d_ff=None if d_ff == default_d_ff(cfg.hidden_size) else d_ff,  # the default as configs write it: null
        max_seq_len=cfg.max_position_embeddings, rope_theta=float(theta), norm_eps=cfg.rms_norm_eps,
        residual_in_fp32=True,  # Llama has no such switch; Lethe's default (identical in fp32)
    )


def mamba2_args(cfg, common: dict, refuse) -> dict:
    # Older configs carry rms_norm and norm_before_gate (transformers 5 drops both and computes
    # norm(y * silu(z)) regardless): refused where they name another model than the one computed.
    if getattr(cfg, "rms_norm", True) is not True:
        refuse("rms_norm", cfg.rms_norm, "Lethe's Mamba-2 mixer ends in a gated RMSNorm, as transformers' always does")
    if getattr(cfg, "norm_before_gate", False):
        refuse("norm_before_gate", cfg.norm_before_gate, "Lethe's Mamba-2 gates, then normalizes: norm(y * silu(z))")
    limit = list(cfg.time_step_limit)
    if limit != [0.0, math.inf] and not (len(limit) == 2 and 0 <= limit[0] <= limit[1]):
        refuse("time_step_limit", limit, "Lethe's dt_limit is [min, max] with 0 <= min <= max, or (0, inf) for none")
    return dict(
        common, d_state=cfg.state_size, d_conv=cfg.conv_kernel, expand=cfg.expand, headdim=cfg.head_dim,
        ngroups=cfg.n_groups, chunk_size=cfg.chunk_size, conv_bias=cfg.use_conv_bias, bias=cfg.use_bias,
        dt_min=cfg.time_step_min, dt_max=cfg.time_step_max, dt_init_floor=cfg.time_step_floor,
        dt_limit=None if limit == [0.0, math.inf] else [float(v) for v in limit],
        norm_eps=cfg.layer_norm_epsilon, residual_in_fp32=cfg.residual_in_fp32,
        # what transformers' Mamba-2 always is, and Lethe-only settings, as model=mamba2-* writes them
        D_has_hdim=False, d_intermediate=0, A_init_range=[1.0, 16.0], scan_impl="auto",
    )


def export_refusal(target: str, c: dict) -> str | None:
    """Why a Lethe model has no transformers equivalent ("<what>; <why>"), or None."""
    off = ", ".join(k for k, v in (c.get("selective") or {}).items() if not v)
    if off:
        return f"selectivity switched off ({off}); transformers' Mamba is always selective"
    if target == MAMBA2_TARGET and c["d_intermediate"]:
        return f"MLP blocks (d_intermediate={c['d_intermediate']}); transformers' Mamba2 blocks are a mixer only"
    if target == MAMBA2_TARGET and c["D_has_hdim"]:
        return "D_has_hdim=true (a D per channel); transformers' Mamba2 has one D per head"
    return None


# ---- export -----------------------------------------------------------------------------------
def export_checkpoint(ckpt_path, out_dir, force: bool = False) -> Path:
    """Write a transformers directory (config.json, model.safetensors, tokenizer) for a Lethe
    checkpoint; returns the directory."""
    model, tokenizer, meta = load_trained_model(ckpt_path)
    target = meta["model_target"]
    if target == model_target(HybridLM):
        raise LetheError(f"checkpoint {ckpt_path} holds a HybridLM (pattern {meta['model_config']['pattern']}): transformers "
                         "has no class for a hybrid stack, so it cannot be exported; score and sample it with eval.py "
                         "and generate.py (a pure stack exports when trained as model=mamba-*, mamba2-* or transformer-*)")
    if target not in HF_NAMES:
        raise LetheError(f"checkpoint {ckpt_path} holds a {target}; Lethe exports MambaLM, Mamba2LM and TransformerLM only")
    refusal = export_refusal(target, meta["model_config"])
    if refusal:
        raise LetheError(f"checkpoint {ckpt_path} holds a {target.rsplit('.', 1)[-1]} with {refusal}, "
                         "so it has no equivalent to export to")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not force:
        raise LetheError(f"{out_dir} already holds a model (config.json); choose a new directory or pass --force")
    config = hf_config(model, target, tokenizer)
    # Built beside the target and moved in with config.json last: a failed export leaves no half-written model.
    with atomic_directory(out_dir, marker="config.json") as tmp:
        save_file(to_hf_state(model, target), tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


# ---- import -----------------------------------------------------------------------------------
def read_hf_weights(hf_dir: Path) -> dict:
    """All tensors of a transformers directory: model.safetensors or pytorch_model.bin, single or sharded."""
    for name, load in (("model.safetensors", load_file), ("pytorch_model.bin", _load_bin)):
        index = hf_dir / f"{name}.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [name]
        if all((hf_dir / f).is_file() for f in files):
            state = {}
            for f in files:
                state.update(load(str(hf_dir / f)))
            return state
    raise LetheError(f"{hf_dir} holds no weights (model.safetensors or pytorch_model.bin, or their .index.json shards)")


def _load_bin(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code from the file


def import_pretrained(hf_dir, out_path, tokenizer_dir=None, force: bool = False) -> dict:
    """Write a Lethe checkpoint for a transformers Mamba, Mamba-2 or Llama directory; returns its metadata."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not (hf_dir / "config.json").is_file():
        raise LetheError(f"{hf_dir} is not a transformers model directory (no config.json); download it first, "
                         "e.g. huggingface-cli download state-spaces/mamba-130m-hf --local-dir <dir>")
    if out_path.exists() and not force:
        raise LetheError(f"{out_path} already exists; choose another path or pass --force")
    try:
        cfg = AutoConfig.from_pretrained(str(hf_dir))
    except Exception as exc:  # transformers raises many types for an unknown model_type or a bad value
        raise LetheError(f"{hf_dir}/config.json could not be read as a transformers config ({first_line(exc, 200)})") from None
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else hf_dir
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise LetheError(f"{tokenizer_dir} has no tokenizer.json; a Lethe checkpoint carries its tokenizer: "
                         "copy the model's tokenizer files there or pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir)

    target, model_config = lethe_config(cfg, len(tokenizer), str(hf_dir))
    meta = {"model_target": target, "model_config": model_config}
    try:
        model = build_model(meta)
    except LetheError as exc:  # a value Lethe's constructor rejects, e.g. an odd head dim
        raise LetheError(f"{hf_dir}: its config does not give a valid Lethe model ({exc})") from None

    hf_state = read_hf_weights(hf_dir)
    hf_state.pop("lm_head.weight", None)  # tied (checked above): HF itself uses the embedding
    if "backbone.embedding.weight" in hf_state:  # pre-release Mamba checkpoints' name, as HF's load hook maps it
        hf_state["backbone.embeddings.weight"] = hf_state.pop("backbone.embedding.weight")
    for name in [n for n in hf_state if n.endswith("rotary_emb.inv_freq")]:
        del hf_state[name]  # a buffer some older Llama checkpoints saved; recomputed, not learned
    # Copied into Lethe's fp32 parameters (the dtype it trains and evaluates in) whatever the file's dtype.
    from_hf_state(model, target, hf_state, str(hf_dir))

    source = {"format": "transformers", "path": str(hf_dir.resolve()), "model_type": cfg.model_type,
              "architectures": getattr(cfg, "architectures", None), "tokenizer": str(tokenizer_dir.resolve())}
    save_model_checkpoint(model, tokenizer, out_path, source=source)
    return {"model_target": target, "model_config": model.config, "num_params": model.num_params(), "source": source}

