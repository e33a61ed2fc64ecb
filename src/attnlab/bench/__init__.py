"""attnlab.bench (see DESIGN.md)."""
