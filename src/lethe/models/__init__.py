"""Language models: Mamba, Mamba-2 and the Transformer++ baseline, sharing `LanguageModel`."""

from lethe.models.lm import LanguageModel, model_target
from lethe.models.mamba import MambaLM
from lethe.models.mamba2 import Mamba2LM
from lethe.models.transformer import TransformerLM

__all__ = ["LanguageModel", "Mamba2LM", "MambaLM", "TransformerLM", "model_target"]
