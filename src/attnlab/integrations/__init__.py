"""attnlab.integrations (see DESIGN.md)."""
