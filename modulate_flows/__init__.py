"""modulate_flows."""
