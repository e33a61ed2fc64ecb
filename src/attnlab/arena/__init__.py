"""attnlab.arena (see DESIGN.md)."""
