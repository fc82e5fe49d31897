"""Interoperability with Hugging Face `transformers`: export Lethe checkpoints to directories that
`AutoModelForCausalLM.from_pretrained` loads, and import such directories as Lethe checkpoints.

    python -m lethe.interop export CKPT OUT_DIR
    python -m lethe.interop import HF_DIR OUT.ckpt
"""

from lethe.interop.hf import export_checkpoint, import_pretrained

__all__ = ["export_checkpoint", "import_pretrained"]
