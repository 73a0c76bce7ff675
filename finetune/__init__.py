"""eoforge.finetune."""
