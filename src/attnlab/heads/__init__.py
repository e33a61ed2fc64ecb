"""attnlab.heads (see DESIGN.md)."""
