"""Training: the loop, checkpoints, fine-tuning types and reporting."""
