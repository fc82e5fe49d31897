"""Language models: Mamba and the Transformer++ baseline, sharing `LanguageModel`."""

from lethe.models.lm import LanguageModel
from lethe.models.mamba import MambaLM
from lethe.models.transformer import TransformerLM

__all__ = ["LanguageModel", "MambaLM", "TransformerLM"]
