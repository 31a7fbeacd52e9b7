"""The MiMo-V2-Flash model: megatron-core's GPTModel with our layer specs and a clear output.

megatron-core's GPTModel hides the MTP loss inside backward (MTPLossAutoScaler) and only
returns the main loss. `MiMoGPTModel` returns every depth explicitly instead: logits per depth
for inference, or per-token losses, shifted loss masks and top-1 hits per depth for training,
so the trainer weights and logs them itself.

Depth 0 is the main model (predicts token t+1 at position t); depth k >= 1 is MTP layer k-1
(predicts token t+k+1 from a hidden state at t and the embedding of token t+k). Which hidden
state is `ModelConfig.mtp_feed`: "chained" runs megatron's MTP block (each layer reads the
previous depth's output after its final_layernorm); "target_hidden" runs the same layers
unchained, each reading the main model's hidden state before its final norm (SGLang's
multi-layer MiMo path, docs/architecture.md).
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
    # Distribution-level distillation (rl/distill.py) needs the main depth's logits next to its
    # losses: with labels, out.logits then holds them ([b, s, vocab / tp]).
    keep_main_logits: bool = False
    mtp_feed: str = "chained"  # build_model sets it from ModelConfig.mtp_feed
    _pre_norm: torch.Tensor | None = None  # target_hidden: the decoder's input to its final norm

    def keep_pre_norm_hidden(self) -> None:
        """target_hidden needs the main model's hidden state before the final norm, which
        megatron's TransformerBlock applies inside; a pre-hook keeps the norm's input."""
        if self.decoder.final_layernorm is None:
            raise ValueError("mtp_feed=target_hidden needs the MTP layers on the pipeline stage that holds the "
                             "final norm; use mtp_feed=chained with this layout")

        def keep(_module, args):
            self._pre_norm = args[0]
        self.decoder.final_layernorm.register_forward_pre_hook(keep)

    def _mtp_from_target(self, trunk, input_ids, position_ids, embedding, **kwargs) -> torch.Tensor:
        """target_hidden: every MTP layer reads the same hidden state (megatron's block would
        chain them); each layer rolls the token ids and positions one further, as in the block.
        Returns [trunk; depth 1; ...; depth K] concatenated on the sequence dim, as the block."""
        feed, self._pre_norm = self._pre_norm, None  # this forward's; not kept past it
        feed = feed.detach() if self.detach_mtp else feed
        depths = [trunk]
        for layer in self.mtp.layers:
            out, input_ids, position_ids = layer(input_ids=input_ids, position_ids=position_ids, hidden_states=feed,
                                                 embedding=embedding, **kwargs)
            depths.append(out)
        return torch.cat(depths, dim=0)

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
            common = dict(attention_mask=attention_mask, inference_params=inference_params,
                          rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                          packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                          **(extra_block_kwargs or {}))
            if self.mtp_feed == "target_hidden":
                hidden_states = self._mtp_from_target(trunk, input_ids, position_ids, embedding, **common)
            else:
                hidden_states = self.mtp(input_ids=input_ids, position_ids=position_ids,
                                         hidden_states=trunk.detach() if self.detach_mtp else trunk,
                                         embedding=embedding, **common)
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
            if depth == 0 and self.keep_main_logits:  # a copy: megatron's cross-entropy overwrites its input
                out.logits.append(logits.transpose(0, 1).clone())
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
    model = MiMoGPTModel(
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
    model.mtp_feed = cfg.mtp_feed
    if cfg.mtp_feed == "target_hidden" and model.mtp_process:
        model.keep_pre_norm_hidden()
    return model


__all__ = ["MiMoGPTModel", "MiMoOutput", "build_model", "roll_left"]
