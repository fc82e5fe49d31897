"""Language models: Mamba and the Transformer++ baseline, sharing `LanguageModel`."""

from lethe.models.lm import LanguageModel, model_target
from lethe.models.mamba import MambaLM
from lethe.models.transformer import TransformerLM

__all__ = ["LanguageModel", "MambaLM", "TransformerLM", "model_target"]
