"""RL post-training: GRPO and MOPD (multi-teacher on-policy distillation)."""
