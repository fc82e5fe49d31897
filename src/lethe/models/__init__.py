"""Language models: Mamba, Mamba-2, the Transformer++ baseline and hybrid stacks of their layers, sharing `LanguageModel`."""

from lethe.models.hybrid import HybridLM
from lethe.models.lm import LanguageModel, model_target
from lethe.models.mamba import MambaLM
from lethe.models.mamba2 import Mamba2LM
from lethe.models.transformer import TransformerLM

__all__ = ["HybridLM", "LanguageModel", "Mamba2LM", "MambaLM", "TransformerLM", "model_target"]
