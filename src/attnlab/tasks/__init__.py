"""attnlab.tasks (see DESIGN.md)."""
