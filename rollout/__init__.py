"""The MTP-speculative rollout engine, imported as `mimo_train.rollout` (not built yet: issue 5)."""
