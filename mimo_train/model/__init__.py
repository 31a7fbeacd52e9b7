"""The MiMo-V2-Flash model on megatron-core."""

from mimo_train.model.config import ModelConfig

__all__ = ["ModelConfig"]
