"""Layers the language models are built from."""

from lethe.modules.attention import CausalSelfAttention, apply_rope, rope_angles
from lethe.modules.block import Block
from lethe.modules.mamba import MambaMixer
from lethe.modules.mamba2 import Mamba2Mixer
from lethe.modules.mlp import SwiGLU
from lethe.modules.norm import GatedRMSNorm, RMSNorm

__all__ = ["Block", "CausalSelfAttention", "GatedRMSNorm", "Mamba2Mixer", "MambaMixer", "RMSNorm", "SwiGLU", "apply_rope", "rope_angles"]
