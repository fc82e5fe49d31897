"""FLOPs per token, counted by hand from the layers, and the GPU peaks that turn them into MFU.

A tracer (Lightning's model summary, fvcore, thop) cannot see inside the fused scan ops, so the
count is analytic, as in nanoGPT's estimate_mfu and PaLM's appendix B. One FLOP is one multiply
or one add (a multiply-add is 2). Per token, forward, at a training length T:

  matmul     2 * in * out for every projection: Mamba's in_proj, x_proj, dt_proj, out_proj;
             Mamba-2's in_proj, out_proj; attention's qkv_proj, o_proj; the MLP's gate_up_proj,
             down_proj; and the LM head. The tied embedding is a lookup: 0.
  conv       2 * d_conv per channel (a multiply-add per tap): d_inner channels in Mamba,
             d_inner + 2 * ngroups * d_state in Mamba-2 (it convolves x, B and C).
  scan       Mamba: 9 per (d_inner, d_state) state element, the count the Mamba authors give
             (state-spaces/mamba#110): 3 to discretize (delta * A, its exp, delta * B * x), 4 for
             the recurrence as a parallel scan runs it (about two multiply-adds per element; the
             CUDA kernel scans affine maps across threads), 2 for the C contraction.
             Mamba-2: 5 per (nheads * headdim = d_inner, d_state) element. The fused kernels
             (scan_impl auto on CPU and CUDA) run SSD as its recurrence, one step at a time over
             a state kept on chip, not in the chunked matmul form: so the recurrent count, 3 for
             H = a * H + (dt * x) B^T (a and dt * x are per head and row: not per element), 2 for
             y = H C. The chunked fallback (scan_impl=chunked) executes more; it is not counted.
  attention  4 * d_model per key a query sees (QK^T and AV, a multiply-add per key and feature
             each). Convention: the causal mask's count, the keys a query really sees: position
             i sees min(i, window) keys, on average (T + 1) / 2 without a window (what causal
             kernels compute; PaLM and nanoGPT count T, twice this). A window caps it; packed
             documents' masks (data.cross_document=false) are not subtracted.

Left out: norms, activations, gates, softplus, RoPE, softmax, residual adds, the D skip, biases
and the loss: a few FLOPs per feature, against the d_model-sized dot products above.

Training = 3 x forward: the backward is 2 x (gradients of the inputs and of the weights), the
usual MFU convention. What kernels recompute in the backward (the fused scans re-run the forward
from saved chunk states, flash attention recomputes scores) is not counted: MFU counts the
model's FLOPs, not the hardware's.
"""

import re

FLOPS_PER_STATE_ELEMENT = {"Mamba": 9, "Mamba-2": 5}  # per token; the derivations above
PARTS = ("matmul", "conv", "scan", "attention")


def context_length(seq_len: int, window: int | None = None) -> float:
    """The mean number of keys a causal query sees in a sequence of seq_len: position i (1-based)
    sees min(i, window)."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _mamba(m, d_model: int, seq_len: int) -> dict:
    x_proj_out = sum(m.x_proj_sizes.values())  # only the selective parts: dt_rank, d_state (B), d_state (C)
    dt_proj = m.dt_rank * m.d_inner if m.selective["delta"] else 0
    weights = d_model * 2 * m.d_inner + m.d_inner * x_proj_out + dt_proj + m.d_inner * d_model
    return {"matmul": 2 * weights, "conv": 2 * m.conv1d.kernel_size[0] * m.d_inner,
            "scan": FLOPS_PER_STATE_ELEMENT["Mamba"] * m.d_inner * m.d_state}


def _mamba2(m, d_model: int, seq_len: int) -> dict:
    in_proj_out = m.d_inner + m.conv_dim + m.nheads  # z, xBC, dt
    weights = d_model * in_proj_out + m.d_inner * d_model
    return {"matmul": 2 * weights, "conv": 2 * m.conv1d.kernel_size[0] * m.conv_dim,
            "scan": FLOPS_PER_STATE_ELEMENT["Mamba-2"] * m.d_inner * m.d_state}


def _attention(m, d_model: int, seq_len: int) -> dict:
    return {"matmul": 2 * (d_model * 3 * d_model + d_model * d_model),
            "attention": 4 * d_model * context_length(seq_len, m.window)}


def _mlp(m, d_model: int, seq_len: int) -> dict:
    d_ff = m.down_proj.in_features
    return {"matmul": 2 * (d_model * 2 * d_ff + d_ff * d_model)}


LAYER_FLOPS = {"Mamba": _mamba, "Mamba-2": _mamba2, "attention": _attention, "MLP": _mlp}  # by layer.kind


def forward_flops(model, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token at training length seq_len, by part (PARTS), for any LanguageModel.
    Read from the layers' sizes, not their weights: the same under FSDP's sharding."""
    d_model = model.embedding.embedding_dim
    parts = dict.fromkeys(PARTS, 0)
    parts["matmul"] = 2 * d_model * model.padded_vocab_size  # the LM head
    for block in model.layers:
        for layer in (block.mixer, block.mlp):
            if layer is None:
                continue
            if layer.kind not in LAYER_FLOPS:
                raise ValueError(f"no FLOP count for {layer.kind} layers; add one to lethe.models.flops.LAYER_FLOPS")
            for part, flops in LAYER_FLOPS[layer.kind](layer, d_model, seq_len).items():
                parts[part] += flops
    return parts


def forward_flops_per_token(model, seq_len: int) -> float:
    return sum(forward_flops(model, seq_len).values())


def training_flops_per_token(model, seq_len: int) -> float:
    """Forward and backward: 3 x forward (recomputation in the backward not counted)."""
    return 3 * forward_flops_per_token(model, seq_len)


def format_flops(flops: float) -> str:
    """3.1e6 -> "3.1 MFLOP"."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} FLOP"


# Dense bf16 tensor-core peaks (no 2:4 sparsity: datasheets print that figure, twice these, first),
# TFLOP/s per device, from NVIDIA's datasheets and architecture whitepapers. The first name found
# in torch.cuda.get_device_name wins, so a variant comes before its family; H100 SXM reports as
# "H100 80GB HBM3". V100 and T4 have no bf16: their fp16 peak. A10G: AWS's figure for its A10
# variant (the A10 itself: 125). Other devices: ThroughputMonitor(peak_tflops=...).
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0), ("GH200", 989.4), ("H200 NVL", 835.5), ("H200", 989.4),
    ("H100 NVL", 835.5), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("A100", 312.0), ("A10G", 70.0), ("A10", 125.0), ("A40", 149.7), ("A6000", 154.8),
    ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("V100 PCIe", 112.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name, None if not in PEAK_BF16_TFLOPS. Names
    match as whole words ("A10" is not "A100", "L4" not "L40S"); "-" counts as a space."""
    name = device_name.upper().replace("-", " ").replace("_", " ")
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(key.upper())}(?![A-Z0-9])", name):
            return tflops
    return None
