"""Benchmark the attention and sampling kernels at MiMo-V2-Flash shapes; prints one JSON document.

    python tools/bench_kernels.py [--seq 8192] [--batch 32] [--context 16384] [--drafts 3]
                                  [--sampling-batches 1,4,16,64] [--vocab 152576]

Each kernel is timed against its torch reference (`attention_reference`, torch eager) and
against `torch.nn.functional.scaled_dot_product_attention` (which has no sinks: it gets the
same mask without them, so it is a speed yardstick, not an equal). Training attention: one
packed row of --seq tokens, 64 query heads, q/k dim 192, v dim 128, bf16; a global layer
(4 kv heads, causal) and a sliding-window layer (8 kv heads, window 128, sinks); forward and
forward + backward, in TFLOP/s over the (query, key) pairs the mask lets through. Decode /
verify attention: --batch sequences of --drafts + 1 query tokens each, against a full cache of
up to --context tokens (global layer, sequence lengths spread over the lower half) or a ring
buffer of window + drafts + 1 slots (window layer); in GB/s of cache, queries and output
moved, and as a share of the GPU's peak memory bandwidth where it is known. Speculative
verification + sampling (`speculative_verify`, kernels/triton_sampling.py against the torch
reference): fp32 target logits [batch, --drafts + 1, --vocab] and draft distributions
[batch, --drafts, --vocab], for each of --sampling-batches and three modes: plain (T = 1),
filtered (T = 0.7, top-k 50, top-p 0.9: the in-kernel threshold search) and greedy (argmax
path); in GB/s of logits and draft distributions read once, and the share of rows whose tokens
differ from the reference's (float rounding at a decision boundary only, so ~0).

Without a CUDA GPU nothing is timed: the JSON says so (gpu: false) and lists the planned cases.
--smoke runs the same code on tiny shapes, on CPU under TRITON_INTERPRET=1 where there is no
GPU (set before start), to test this tool; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo_train.kernels.attention import attention, attention_reference  # noqa: E402
from mimo_train.kernels.sampling import sample, speculative_verify  # noqa: E402

MIMO = dict(heads=64, dk=192, dv=128, window=128, kv_heads={"global": 4, "swa": 8}, vocab=152576)
SMOKE = dict(heads=2, dk=24, dv=16, window=5, kv_heads={"global": 1, "swa": 2}, vocab=100)
SAMPLING_MODES = {"plain": dict(temperature=1.0, top_k=None, top_p=None),
                  "filtered": dict(temperature=0.7, top_k=50, top_p=0.9),
                  "greedy": dict(temperature=0.0, top_k=None, top_p=None)}
DEVICE = "cuda"
# Peak memory bandwidth in GB/s by device-name fragment, most specific first.
PEAK_GBS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
            ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864)]


def environment() -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                gpu=torch.cuda.is_available())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if info["gpu"]:
        name = torch.cuda.get_device_name()
        info.update(device=name, peak_gbs=next((gbs for frag, gbs in PEAK_GBS if frag in name), None))
    return info


def timed(fn) -> dict:
    """Median milliseconds of fn (L2 flushed between runs), or why it could not run."""
    try:
        if not torch.cuda.is_available():  # --smoke on CPU: one run, the figure means nothing
            start = time.perf_counter()
            fn()
            return dict(ms=1e3 * (time.perf_counter() - start))
        from triton.testing import do_bench

        return dict(ms=do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(error="out of memory")
    except Exception as exc:  # noqa: BLE001  a yardstick that cannot run is reported, not fatal
        return dict(error=f"{type(exc).__name__}: {exc}"[:300])


def visible_pairs(lengths: list[int], window: int | None) -> int:
    """(query, key) pairs the mask lets through for causal packed sequences."""
    total = 0
    for n in lengths:
        if window is None or window + 1 >= n:
            total += n * (n + 1) // 2
        else:
            w = window + 1
            total += w * (w + 1) // 2 + (n - w) * w
    return total


def training_case(shape: dict, layer: str, seq: int, segments: int) -> dict:
    lengths = [seq // segments] * (segments - 1) + [seq - (seq // segments) * (segments - 1)]
    return dict(kind="training_attention", layer=layer, tokens=seq, segments=lengths, heads=shape["heads"],
                kv_heads=shape["kv_heads"][layer], dk=shape["dk"], dv=shape["dv"],
                window=shape["window"] if layer == "swa" else None, sinks=layer == "swa", dtype="bfloat16")


def bench_training(case: dict) -> dict:
    dev, bf16 = DEVICE, torch.bfloat16
    n, kv, lengths, window = case["tokens"], case["kv_heads"], case["segments"], case["window"]
    heads, dk, dv = case["heads"], case["dk"], case["dv"]
    lens = torch.tensor(lengths, device=dev)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lens)
    pos = torch.arange(n, device=dev) - (lens.cumsum(0) - lens)[seg]
    q = torch.randn(1, n, heads, dk, device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(1, n, kv, dk, device=dev, dtype=bf16, requires_grad=True)
    v = torch.randn(1, n, kv, dv, device=dev, dtype=bf16, requires_grad=True)
    sinks = torch.randn(heads, device=dev, requires_grad=True) if case["sinks"] else None
    kw = dict(scale=dk ** -0.5, q_pos=pos[None], k_pos=pos[None], sinks=sinks, window=window,
              q_seg=seg[None] if len(lengths) > 1 else None, k_seg=seg[None] if len(lengths) > 1 else None)
    grad = torch.randn(1, n, heads, dv, device=dev, dtype=bf16)
    pairs = visible_pairs(lengths, window) * heads
    flops = dict(fwd=2 * pairs * (dk + dv), fwd_bwd=2 * pairs * (4 * dk + 3 * dv))

    def triton_fwd():
        with torch.no_grad():
            attention(q, k, v, backend="triton", **kw)

    def triton_fwd_bwd():
        attention(q, k, v, backend="triton", **kw)[0].backward(grad)

    def ref_fwd():  # in head chunks: all 64 heads' fp32 score matrices at once do not fit
        with torch.no_grad():
            reference_chunks(q, k, v, kw, grad=None)

    def ref_fwd_bwd():
        reference_chunks(q, k, v, kw, grad=grad)

    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    allowed = (pos[None, :] <= pos[:, None]) & (seg[:, None] == seg[None, :])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] <= window
    mask = None if (window is None and len(lengths) == 1) else allowed

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None,
                                           scale=kw["scale"], enable_gqa=True)

    def sdpa_fwd_bwd():
        F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None, scale=kw["scale"],
                                       enable_gqa=True).backward(grad.transpose(1, 2))

    result = dict(case, check=check_training(q, k, v, kw))
    for name, fns in dict(triton=(triton_fwd, triton_fwd_bwd), torch_eager_reference=(ref_fwd, ref_fwd_bwd),
                          sdpa_without_sinks=(sdpa_fwd, sdpa_fwd_bwd)).items():
        result[name] = {}
        for what, fn in zip(("fwd", "fwd_bwd"), fns):
            t = timed(fn)
            if "ms" in t:
                t["tflops"] = flops[what] / t["ms"] / 1e9
            result[name][what] = t
    for other in ("torch_eager_reference", "sdpa_without_sinks"):
        for what in ("fwd", "fwd_bwd"):
            a, b = result["triton"][what], result[other][what]
            if "ms" in a and "ms" in b:
                result["triton"][f"{what}_speedup_vs_{other}"] = b["ms"] / a["ms"]
    return result


def reference_chunks(q, k, v, kw, grad, heads_per_chunk: int = 8):
    rep = q.shape[2] // k.shape[2]
    for h0 in range(0, q.shape[2], heads_per_chunk):
        hs = slice(h0, h0 + heads_per_chunk)
        ks = slice(h0 // rep, (h0 + heads_per_chunk - 1) // rep + 1)
        sub = dict(kw, sinks=kw["sinks"][hs] if kw["sinks"] is not None else None)
        out, _ = attention_reference(q[:, :, hs], k[:, :, ks], v[:, :, ks], **sub)
        if grad is not None:
            out.backward(grad[:, :, hs])


def check_training(q, k, v, kw) -> dict:
    """Max relative error of the Triton forward against the reference on the first 8 heads."""
    rep = q.shape[2] // k.shape[2]
    sub = dict(kw, sinks=kw["sinks"][:8] if kw["sinks"] is not None else None)
    with torch.no_grad():
        args = (q[:, :, :8], k[:, :, : max(1, 8 // rep)], v[:, :, : max(1, 8 // rep)])
        out, _ = attention(*args, backend="triton", **sub)
        ref, _ = attention_reference(*args, **sub)
    return dict(max_rel_err_fwd_8_heads=((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())


def decode_case(shape: dict, layer: str, batch: int, context: int, drafts: int) -> dict:
    window = shape["window"] if layer == "swa" else None
    return dict(kind="decode_attention", layer=layer, batch=batch, query_tokens=drafts + 1,
                cache_slots=context if window is None else window + drafts + 1, max_context=context,
                heads=shape["heads"], kv_heads=shape["kv_heads"][layer], dk=shape["dk"], dv=shape["dv"],
                window=window, sinks=layer == "swa", dtype="bfloat16")


def bench_decode(case: dict, peak_gbs: float | None) -> dict:
    dev, bf16 = DEVICE, torch.bfloat16
    b, sq, slots = case["batch"], case["query_tokens"], case["cache_slots"]
    kv, window = case["kv_heads"], case["window"]
    heads, dk, dv = case["heads"], case["dk"], case["dv"]
    gen = torch.Generator().manual_seed(0)
    # context lengths spread over [context/2, context]: a batch of different lengths
    lengths = torch.randint(case["max_context"] // 2, case["max_context"] + 1, (b,), generator=gen)
    k_pos = torch.full((b, slots), -1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        p = torch.arange(max(0, n - slots), n)
        k_pos[i, p % slots] = p  # full cache: slot = position; ring: position mod size
    q_pos = (lengths[:, None] - sq + torch.arange(sq)).to(dev)
    k_pos = k_pos.to(dev)
    q = torch.randn(b, sq, heads, dk, device=dev, dtype=bf16)
    k = torch.randn(b, slots, kv, dk, device=dev, dtype=bf16)
    v = torch.randn(b, slots, kv, dv, device=dev, dtype=bf16)
    sinks = torch.randn(heads, device=dev) if case["sinks"] else None
    kw = dict(scale=dk ** -0.5, q_pos=q_pos, k_pos=k_pos, sinks=sinks, window=window)
    used = int((k_pos >= 0).sum())
    moved = used * kv * (dk + dv) * 2 + q.numel() * 2 + b * sq * heads * dv * 2

    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    if window is not None:
        allowed &= q_pos[:, :, None] - k_pos[:, None, :] <= window
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    fns = dict(
        triton=lambda: attention(q, k, v, backend="triton", **kw),
        torch_eager_reference=lambda: attention_reference(q, k, v, **kw),
        sdpa_without_sinks=lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed[:, None],
                                                                   scale=kw["scale"], enable_gqa=True))
    with torch.no_grad():
        out, _ = fns["triton"]()
        ref, _ = fns["torch_eager_reference"]()
        error = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        result = dict(case, bytes_moved=moved, cached_tokens=used, check=dict(max_rel_err=error))
        for name, fn in fns.items():
            t = timed(fn)
            if "ms" in t:
                t["gbs"] = moved / t["ms"] / 1e6
                if peak_gbs:
                    t["pct_of_peak_bandwidth"] = 100 * t["gbs"] / peak_gbs
            result[name] = t
    for other in ("torch_eager_reference", "sdpa_without_sinks"):
        if "ms" in result["triton"] and "ms" in result[other]:
            result["triton"][f"speedup_vs_{other}"] = result[other]["ms"] / result["triton"]["ms"]
    return result


def sampling_case(vocab: int, batch: int, drafts: int, mode: str) -> dict:
    return dict(kind="speculative_sampling", mode=mode, batch=batch, drafts=drafts, vocab=vocab, dtype="float32",
                **SAMPLING_MODES[mode])


def bench_sampling(case: dict, peak_gbs: float | None) -> dict:
    dev = DEVICE
    b, k, vocab, mode = case["batch"], case["drafts"], case["vocab"], case["mode"]
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(b, k + 1, vocab, generator=gen)).to(dev)
    temperature = torch.full((b,), case["temperature"], device=dev)
    top_k = torch.full((b,), case["top_k"], device=dev) if case["top_k"] else None
    top_p = torch.full((b,), case["top_p"], device=dev) if case["top_p"] else None
    u = torch.rand(b, k + 1, generator=gen).to(dev)
    greedy = mode == "greedy"
    # A drafter close to the target, so that rows accept different numbers of drafts.
    draft_logits = logits[:, :k] + torch.randn(b, k, vocab, generator=gen).to(dev)
    drafts, q = sample(draft_logits, temperature, top_k, top_p, torch.rand(b, k, generator=gen).to(dev))
    args = (logits, drafts, None if greedy else q, temperature, top_k, top_p, None if greedy else u)
    moved = logits.numel() * 4 + (0 if greedy else q.numel() * 4)
    fns = dict(triton=lambda: speculative_verify(*args, greedy=greedy, backend="triton"),
               torch_eager_reference=lambda: speculative_verify(*args, greedy=greedy, backend="torch"))
    out, ref = fns["triton"](), fns["torch_eager_reference"]()
    differ = ((out[0] != ref[0]) | (out[1] != ref[1]).any(-1)).float().mean().item()
    same = out[1] == ref[1]
    lp_err = (out[2] - ref[2])[same & (ref[1] >= 0)].abs().max().item() if same.any() else 0.0
    result = dict(case, bytes_moved=moved, mean_accepted=ref[0].float().mean().item(),
                  check=dict(rows_differing=differ, max_abs_err_logprobs=lp_err))
    for name, fn in fns.items():
        t = timed(fn)
        if "ms" in t:
            t["gbs"] = moved / t["ms"] / 1e6
            if peak_gbs:
                t["pct_of_peak_bandwidth"] = 100 * t["gbs"] / peak_gbs
        result[name] = t
    a, b = result["triton"], result["torch_eager_reference"]
    if "ms" in a and "ms" in b:
        a["speedup_vs_torch_eager_reference"] = b["ms"] / a["ms"]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192, help="training tokens (one packed row)")
    parser.add_argument("--segments", type=int, default=1, help="packed sequences in the training row")
    parser.add_argument("--batch", type=int, default=32, help="decode: sequences")
    parser.add_argument("--context", type=int, default=16384, help="decode: longest context (global layer cache)")
    parser.add_argument("--drafts", type=int, default=3, help="decode: K drafted tokens (K + 1 queries)")
    parser.add_argument("--sampling-batches", default="1,4,16,64", help="sampling: batch sizes, comma-separated")
    parser.add_argument("--vocab", type=int, default=None, help="sampling: vocabulary (default MiMo-V2-Flash's)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: tests this tool")
    args = parser.parse_args(argv)
    shape = SMOKE if args.smoke else MIMO
    if args.smoke:
        args.seq, args.batch, args.context, args.sampling_batches = 21, 2, 24, "2"
    cases = [training_case(shape, layer, args.seq, args.segments) for layer in ("global", "swa")]
    cases += [decode_case(shape, layer, args.batch, args.context, d) for layer in ("global", "swa")
              for d in (0, args.drafts)]
    cases += [sampling_case(args.vocab or shape["vocab"], int(b), args.drafts, mode)
              for b in args.sampling_batches.split(",") for mode in SAMPLING_MODES]
    env = environment()
    if not env["gpu"] and not args.smoke:
        return dict(gpu=False, message=(
            "No CUDA GPU present: the Triton kernels were not benchmarked and no timings are reported. Their "
            "correctness on CPU is covered by tests/kernels under TRITON_INTERPRET=1; run this tool on a GPU for "
            "TFLOP/s and GB/s."), environment=env, cases=cases, results=[])
    global DEVICE
    DEVICE = "cuda" if env["gpu"] else "cpu"
    report = dict(gpu=env["gpu"], smoke=args.smoke, environment=env, cases=cases)
    peak = env.get("peak_gbs")
    bench = dict(training_attention=bench_training, decode_attention=lambda c: bench_decode(c, peak),
                 speculative_sampling=lambda c: bench_sampling(c, peak))
    report["results"] = [bench[c["kind"]](c) for c in cases]
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
