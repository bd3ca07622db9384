"""kvstore.agent (see DESIGN.md)."""
