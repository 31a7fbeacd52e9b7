"""Packed sequences: positions restart and attention stops at each boundary, so a packed row
gives each sequence the logits it has alone."""

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model


def test_packed_row_equals_separate_sequences(megatron_single):
    cfg = ModelConfig.preset("tiny", sliding_window_size=4)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    lengths = [7, 13, 5]
    seqs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, 7, 20, 25], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    with torch.no_grad():
        together = model(torch.cat(seqs, dim=1), packed_seq_params=packed).logits
        for i, seq in enumerate(seqs):
            for depth, alone in enumerate(model(seq).logits):  # main model and every MTP depth
                part = together[depth][:, cu[i]:cu[i + 1]]
                assert (part - alone).abs().max().item() <= 1e-5, f"sequence {i}, depth {depth}"
