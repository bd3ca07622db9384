"""kvstore.connectors (see DESIGN.md)."""
