"""Training on accelerate: the loop (`loop`), recipes, checkpoints and few-step distillation."""
