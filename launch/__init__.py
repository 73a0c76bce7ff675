"""eoforge.launch."""
