"""Specification of packing: documents -> samples of exactly seq_len tokens -> THD micro-batches."""

import random

import pytest
import torch

from mimo_train.data.packing import Document, collate_thd, pack_documents, pretrain_document, sft_document

BOS, EOS, PAD = 1, 2, 0


def doc(*tokens: int) -> Document:
    return Document(list(tokens), [True] * len(tokens))


def segments(sample: dict, key: str) -> list[list]:
    """`sample[key]` cut at the document boundaries."""
    out, start = [], 0
    for n in sample["doc_lens"]:
        out.append(sample[key][start:start + n].tolist())
        start += n
    return out


def samples(packed) -> list[dict]:
    return [packed.sample(i) for i in range(len(packed))]


def test_every_sample_has_exactly_seq_len_tokens_and_doc_lens_sum_to_it():
    packed = pack_documents([doc(*range(10, 10 + n)) for n in (5, 4, 3, 7, 1)], seq_len=8, pad_id=PAD)
    for s in samples(packed):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert s[key].shape == (8,)
        assert s["tokens"].dtype == s["labels"].dtype == s["position_ids"].dtype == torch.long
        assert s["loss_mask"].dtype == torch.float32
        assert sum(s["doc_lens"]) == 8


def test_greedy_packing_keeps_document_order_and_starts_a_new_sample_when_one_does_not_fit():
    a, b, c = doc(10, 11, 12, 13, 14), doc(20, 21, 22, 23), doc(30, 31, 32)
    first, second = samples(pack_documents([a, b, c], seq_len=8, pad_id=PAD))
    assert first["doc_lens"] == [5, 3]  # b (4) does not fit in the 3 left: pad, and b opens the next sample
    assert segments(first, "tokens") == [a.tokens, [PAD] * 3]
    assert second["doc_lens"] == [4, 3, 1]
    assert segments(second, "tokens") == [b.tokens, c.tokens, [PAD]]


def test_position_ids_restart_at_every_document_and_at_the_pad():
    s = samples(pack_documents([doc(10, 11, 12), doc(20, 21), doc(30, 31, 32, 33)], seq_len=12, pad_id=PAD))[0]
    assert s["doc_lens"] == [3, 2, 4, 3]
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]


def test_labels_are_the_next_token_of_the_same_document_and_never_cross_a_boundary():
    s = samples(pack_documents([doc(10, 11, 12), doc(20, 21)], seq_len=8, pad_id=PAD))[0]
    assert segments(s, "labels") == [[11, 12, 0], [21, 0], [0, 0, 0]]
    assert segments(s, "loss_mask") == [[1, 1, 0], [1, 0], [0, 0, 0]]  # a document's last token predicts nothing


def test_pad_segment_is_pad_tokens_fully_masked():
    s = samples(pack_documents([doc(10, 11, 12)], seq_len=7, pad_id=PAD))[0]
    assert s["doc_lens"] == [3, 4]
    pad = slice(3, 7)
    assert s["tokens"][pad].tolist() == [PAD] * 4
    assert s["labels"][pad].tolist() == [0] * 4
    assert s["loss_mask"][pad].tolist() == [0.0] * 4


def test_a_sample_that_is_full_has_no_pad_segment():
    s = samples(pack_documents([doc(10, 11, 12), doc(20, 21, 22, 23, 24)], seq_len=8, pad_id=PAD))[0]
    assert s["doc_lens"] == [3, 5]


def test_a_document_longer_than_seq_len_is_cut_into_documents_of_their_own():
    long = doc(*range(10, 30))  # 20 tokens, seq_len 8: chunks of 8, 8, 4
    first, second, third = samples(pack_documents([long, doc(40, 41, 42)], seq_len=8, pad_id=PAD))
    assert first["doc_lens"] == [8] and second["doc_lens"] == [8]
    assert third["doc_lens"] == [4, 3, 1]  # the last chunk packs with what follows
    assert first["tokens"].tolist() == list(range(10, 18))
    assert second["position_ids"].tolist() == list(range(8))  # a chunk is a document: positions from 0
    # The chunk's last token cannot see the next chunk, so it has no target.
    assert first["labels"].tolist() == list(range(11, 18)) + [0]
    assert first["loss_mask"].tolist() == [1.0] * 7 + [0.0]


def test_without_packing_each_document_is_one_padded_sample():
    packed = samples(pack_documents([doc(10, 11), doc(20, 21, 22), doc(*range(30, 40))], seq_len=4, pad_id=PAD,
                                    pack=False))
    assert [s["doc_lens"] for s in packed] == [[2, 2], [3, 1], [4], [4], [2, 2]]
    assert packed[0]["tokens"].tolist() == [10, 11, PAD, PAD]
    assert packed[0]["loss_mask"].tolist() == [1, 0, 0, 0]


def test_pretrain_document_trains_on_every_predicted_token():
    s = samples(pack_documents([pretrain_document([10, 11, 12], BOS, EOS)], seq_len=5, pad_id=PAD))[0]
    assert s["tokens"].tolist() == [BOS, 10, 11, 12, EOS]
    assert s["labels"].tolist() == [10, 11, 12, EOS, 0]
    assert s["loss_mask"].tolist() == [1, 1, 1, 1, 0]


def test_sft_loss_is_exactly_on_the_response_and_eos():
    prompt, response = [10, 11, 12], [20, 21]
    s = samples(pack_documents([sft_document(prompt, response, BOS, EOS)], seq_len=9, pad_id=PAD))[0]
    assert s["tokens"].tolist() == [BOS, 10, 11, 12, 20, 21, EOS, PAD, PAD]
    assert s["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]  # positions that predict 20, 21, eos
    trained = s["labels"][s["loss_mask"].bool()].tolist()
    assert trained == response + [EOS]


def test_sft_masking_survives_a_cut_through_the_prompt():
    prompt, response = list(range(10, 17)), [20, 21]  # bos + 7 + 2 + eos = 11 tokens, seq_len 6
    first, second = samples(pack_documents([sft_document(prompt, response, BOS, EOS)], seq_len=6, pad_id=PAD))
    assert first["loss_mask"].sum() == 0  # only prompt here
    assert second["tokens"].tolist()[:5] == [15, 16, 20, 21, EOS]
    assert second["labels"][second["loss_mask"].bool()].tolist() == response + [EOS]


def test_optional_bos_and_eos():
    assert pretrain_document([10, 11], None, None).tokens == [10, 11]
    d = sft_document([10], [20], None, EOS)
    assert d.tokens == [10, 20, EOS] and d.targets == [False, True, True]


def test_packing_loses_nothing_and_keeps_order():
    rng = random.Random(0)
    docs = [doc(*[rng.randrange(4, 50) for _ in range(rng.randint(1, 30))]) for _ in range(200)]
    packed = samples(pack_documents(docs, seq_len=16, pad_id=PAD))
    real = [seg for s in packed for seg, n in zip(segments(s, "tokens"), s["doc_lens"])
            if seg != [PAD] * n]
    expected = [d.tokens[i:i + 16] for d in docs for i in range(0, len(d.tokens), 16)]
    assert real == expected
    for s in packed:  # invariants of every sample
        pos = torch.cat([torch.arange(n) for n in s["doc_lens"]])
        assert torch.equal(s["position_ids"], pos)
        ends = torch.cumsum(torch.tensor(s["doc_lens"]), 0) - 1
        assert s["labels"][ends].eq(0).all() and s["loss_mask"][ends].eq(0).all()


def test_collate_thd_concatenates_samples_into_one_row_with_cu_seqlens():
    packed = samples(pack_documents([doc(10, 11, 12), doc(20, 21, 22, 23, 24), doc(30, 31)], seq_len=6, pad_id=PAD))
    assert [s["doc_lens"] for s in packed] == [[3, 3], [5, 1], [2, 4]]
    batch = collate_thd(packed)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (1, 18)
        assert torch.equal(batch[key][0], torch.cat([s[key] for s in packed]))
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 11, 12, 14, 18]
    assert batch["max_seqlen"] == 5
    # Each segment between cu_seqlens starts at position 0.
    assert batch["position_ids"][0, batch["cu_seqlens"][:-1].long()].eq(0).all()


def test_collate_of_one_sample_matches_the_sample():
    s = samples(pack_documents([doc(10, 11)], seq_len=4, pad_id=PAD))[0]
    batch = collate_thd([s])
    assert batch["tokens"].tolist() == [[10, 11, PAD, PAD]]
    assert batch["cu_seqlens"].tolist() == [0, 2, 4]


def test_samples_are_copies():
    packed = pack_documents([doc(10, 11)], seq_len=4, pad_id=PAD)
    packed.sample(0)["tokens"][0] = 99
    assert packed.sample(0)["tokens"][0] == 10


@pytest.mark.parametrize("seq_len", [1, 2, 3])
def test_tiny_seq_len_still_fills_every_sample(seq_len):
    packed = samples(pack_documents([doc(10, 11, 12, 13, 14)], seq_len=seq_len, pad_id=PAD))
    assert all(sum(s["doc_lens"]) == seq_len for s in packed)
