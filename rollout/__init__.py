"""The MTP-speculative rollout engine, imported as `mimo_train.rollout`.

    engine = Engine.from_pretrained(serving_dir, EngineConfig(max_batch=16))
    completions, metrics = engine.generate(prompts, SamplingParams(temperature=1.0, n=4))
    engine.update_weights(trainer_state_in_serving_names)   # or receive_weights(...) over gloo/NCCL
"""

from mimo_train.rollout.api import Completion, Metrics, SamplingParams
from mimo_train.rollout.engine import Engine, EngineConfig
from mimo_train.rollout.model import route
from mimo_train.rollout.weight_sync import receive_weights, send_weights

__all__ = ["Completion", "Engine", "EngineConfig", "Metrics", "SamplingParams", "receive_weights", "route",
           "send_weights"]
