"""The MiMo-V2-Flash model: megatron-core's GPTModel with our layer specs and a clear output.

megatron-core's GPTModel hides the MTP loss inside backward (MTPLossAutoScaler) and only
returns the main loss. `MiMoGPTModel` returns every depth explicitly instead: logits per depth
for inference, or per-token losses, shifted loss masks and top-1 hits per depth for training,
so the trainer weights and logs them itself.

Depth 0 is the main model (predicts token t+1 at position t); depth k >= 1 is MTP layer k-1
(predicts token t+k+1 from the previous depth's hidden state and the embedding of token t+k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.multi_token_prediction import roll_tensor

from mimo_train.model import compat
from mimo_train.model.config import ModelConfig
from mimo_train.model.spec import MegatronOptions, decoder_block_spec, mtp_block_spec, transformer_config


@dataclass
class MiMoOutput:
    logits: list[torch.Tensor] = field(default_factory=list)  # per depth [b, s, vocab / tp]; no labels
    losses: list[torch.Tensor] = field(default_factory=list)  # per depth [b, s] cross-entropy
    loss_masks: list[torch.Tensor] = field(default_factory=list)  # per depth [b, s], shifted by depth
    correct: list[torch.Tensor] = field(default_factory=list)  # per depth [b, s] top-1 == target


def vocab_parallel_top1_correct(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Whether the target has the largest logit, with the vocab split over TP ranks.

    logits [s, b, v_local], labels [s, b]. Compares the target's logit with the global max.
    """
    v_local = logits.shape[-1]
    start = tp_group.rank() * v_local
    local = labels - start
    inside = (local >= 0) & (local < v_local)
    target = torch.gather(logits, -1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target = torch.where(inside, target, torch.full_like(target, float("-inf")))
    best = logits.max(dim=-1).values
    if tp_group.size() > 1:
        torch.distributed.all_reduce(target, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    return target >= best


def roll_left(tensor: torch.Tensor, packed_seq_params=None, cp_group=None) -> torch.Tensor:
    """Shift [b, s] targets or masks one position left for the next depth (zero at each
    sequence's end, packed sequences respected): depth k's labels are depth k-1's, rolled."""
    return roll_tensor(tensor, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)[0]


class MiMoGPTModel(GPTModel):
    # RL settings (mimo_train.rl.trainer sets them): the main depth's logits (and so its losses)
    # are taken at this sampling temperature, so that -loss is the policy's log-prob of what the
    # engine sampled;
    # with `detach_mtp` the MTP depths learn on the same forward without moving the trunk, the
    # embedding or the output layer (their loss reaches only the MTP layers).
    logit_temperature: float = 1.0
    detach_mtp: bool = False

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, loss_mask=None,
                packed_seq_params=None, decoder_input=None, **kwargs) -> MiMoOutput | torch.Tensor:
        if position_ids is None and input_ids is not None:
            # Our attention derives positions itself; megatron's MTP still rolls position_ids.
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
                               loss_mask=loss_mask, packed_seq_params=packed_seq_params, **kwargs)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                     rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, decoder_input=None,
                     attention_mask=None, inference_params=None, packed_seq_params=None,
                     sequence_len_offset=None, runtime_gather_output=None, extra_block_kwargs=None,
                     inference_context=None):
        trunk = hidden_states
        if mtp_in_postprocess:
            embedding = self.embedding
            if self.detach_mtp:
                embedding = lambda **kw: self.embedding(**kw).detach()  # noqa: E731
            hidden_states = self.mtp(
                input_ids=input_ids, position_ids=position_ids,
                hidden_states=trunk.detach() if self.detach_mtp else trunk,
                attention_mask=attention_mask, inference_params=inference_params, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset, embedding=embedding, **(extra_block_kwargs or {}))
        if not self.post_process:
            return hidden_states

        depths = list(torch.chunk(hidden_states, 1 + (self.config.mtp_num_layers or 0), dim=0))
        if self.detach_mtp and len(depths) > 1:
            depths[0] = trunk  # the MTP block passes its (detached) input through as depth 0
        mtp_weight = self.output_layer.weight.detach() if self.detach_mtp else None
        out = MiMoOutput()
        targets, mask = labels, loss_mask
        if labels is not None and mask is None:
            mask = torch.ones_like(labels, dtype=torch.float32)
        for depth, hidden in enumerate(depths):
            logits, _ = self.output_layer(hidden, weight=mtp_weight if depth else None,
                                          runtime_gather_output=runtime_gather_output)  # [s, b, v]
            if depth == 0 and self.logit_temperature != 1.0:
                logits = logits / self.logit_temperature
            if labels is None:
                out.logits.append(logits.transpose(0, 1).contiguous())
                continue
            if depth > 0:  # depth k predicts labels shifted left by k more positions
                targets = roll_left(targets, packed_seq_params, self.cp_group)
                mask = roll_left(mask, packed_seq_params, self.cp_group)
            out.losses.append(self.compute_language_model_loss(targets, logits))
            out.loss_masks.append(mask.float())
            with torch.no_grad():
                hit = vocab_parallel_top1_correct(logits.detach(), targets.transpose(0, 1), self.pg_collection.tp)
            out.correct.append(hit.transpose(0, 1))
        return out


def build_model(cfg: ModelConfig, opt: MegatronOptions | None = None, *, vp_stage: int | None = None,
                pre_process: bool | None = None, post_process: bool | None = None,
                config: TransformerConfig | None = None) -> MiMoGPTModel:
    """Build this rank's part of the model. megatron's parallel state must be initialised
    (see mimo_train.parallel.setup). `config` overrides the TransformerConfig made from cfg/opt."""
    compat.apply()
    config = config or transformer_config(cfg, opt or MegatronOptions())
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return MiMoGPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(cfg, config, vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        mtp_block_spec=mtp_block_spec(cfg, config, vp_stage),
        vp_stage=vp_stage,
    )


__all__ = ["MiMoGPTModel", "MiMoOutput", "build_model", "roll_left"]
