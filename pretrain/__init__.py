"""eoforge.pretrain."""
