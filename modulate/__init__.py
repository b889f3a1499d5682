"""modulate."""
