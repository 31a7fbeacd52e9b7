"""Training: losses, steps, loops."""
