"""Models built from any registered mechanism(s)."""

from attnlab.models.transformer_lm import Block, TransformerLM

__all__ = ["Block", "TransformerLM"]
