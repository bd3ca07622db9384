"""kvstore.master (see DESIGN.md)."""
