"""Process groups and megatron-core parallel state."""
