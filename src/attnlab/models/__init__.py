"""attnlab.models (see DESIGN.md)."""
