"""Bridges to other libraries, each imported lazily (``attnlab.integrations.hf``: Hugging Face
transformers)."""
