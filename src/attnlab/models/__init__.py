"""Models built from any registered mechanism(s)."""

import attnlab.mechanisms  # noqa: F401  (registers the built-in mechanisms the models build)
from attnlab.models.blocks import Block
from attnlab.models.encoder import Encoder, ViT
from attnlab.models.icl_regressor import ICLRegressor
from attnlab.models.transformer_lm import TransformerLM

__all__ = ["Block", "Encoder", "ICLRegressor", "TransformerLM", "ViT"]
