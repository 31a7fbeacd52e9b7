"""The kernels compile for an H100 (sm_90) at MiMo-V2-Flash shapes, bf16, with the block sizes
and launch options the wrappers use: Triton's own compiler and ptxas, no GPU needed. The
interpreter runs Python, not the compiler, so this is what catches code that interprets but
does not compile (or needs more shared memory than the GPU has) on a machine without a GPU."""

import pytest
import torch

from tests.kernels.attention_utils import interpreter_active

pytest.importorskip("triton")
if interpreter_active():
    pytest.skip("kernels built for the interpreter cannot be compiled", allow_module_level=True)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mimo_train.kernels import triton_attention, triton_decode, triton_sampling  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
H100 = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 227 * 1024  # per block on sm_90
POINTERS = {"Q": "bf16", "K": "bf16", "V": "bf16", "O": "bf16", "DO": "bf16", "DQ": "bf16", "DK_": "bf16",
            "DV_": "bf16", "LSE": "fp32", "SINKS": "fp32", "DELTA": "fp32", "M_PART": "fp32", "L_PART": "fp32",
            "ACC_PART": "fp32", "QPOS": "i64", "KPOS": "i64", "QSEG": "i64", "KSEG": "i64",
            "KV_LO": "i32", "KV_HI": "i32", "Q_LO": "i32", "Q_HI": "i32"}
FLOATS = {"qk_scale", "scale"}
SAMPLING_POINTERS = {"LOGITS": "fp32", "TEMP": "fp32", "TOPK": "i64", "TOPP": "fp32", "DRAFTS": "i64", "Q": "fp32",
                     "U": "fp32", "M": "fp32", "LOGZ": "fp32", "ZK": "fp32", "THR": "i32", "AMAX": "i32",
                     "ACC": "i32", "N_ACC": "i64", "TOKENS": "i64", "LOGPROBS": "fp32"}


def compile_for_h100(kernel, constants: dict, launch: dict, pointers: dict = POINTERS):
    signature = {name: "constexpr" if name in constants else f"*{pointers[name]}" if name in pointers
                 else "fp32" if name in FLOATS else "i32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=H100, options=launch)
    assert compiled.asm.get("cubin"), "no machine code"
    assert compiled.metadata.shared <= SHARED_MEMORY
    return compiled


def flags(window=True, seg=True):
    return dict(DK=192, DV=128, HAS_WINDOW=window, HAS_SEG=seg, PRECISION="tf32")


def test_training_kernels_compile():
    consts, launch = triton_attention.config("cuda", torch.bfloat16, 192, 128, backward=False)
    compile_for_h100(triton_attention._fwd_kernel, dict(consts, HAS_SINK=True, **flags()), launch)
    consts, launch = triton_attention.config("cuda", torch.bfloat16, 192, 128, backward=True)
    compile_for_h100(triton_attention._bwd_dq_kernel, dict(consts, **flags()), launch)
    compile_for_h100(triton_attention._bwd_dkdv_kernel, dict(consts, **flags()), launch)


@pytest.mark.parametrize("layer", ["global", "swa"])
def test_decode_kernels_compile(layer):
    rep, window = (16, False) if layer == "global" else (8, True)  # 64 heads over 4 / 8 kv heads
    consts, launch = triton_decode.config("cuda", torch.bfloat16, rep * 4, 192, 128)  # K + 1 = 4 queries
    compile_for_h100(triton_decode._split_kernel, dict(consts, **flags(window, seg=False)), launch)
    if layer == "swa":
        merge = dict(DV=128, BLOCK_M=consts["BLOCK_M"], BLOCK_DV=consts["BLOCK_DV"], HAS_SINK=True)
        compile_for_h100(triton_decode._merge_kernel, merge, {})


@pytest.mark.parametrize("greedy", [False, True])
def test_sampling_kernels_compile(greedy):
    """Speculative verification at the vocabulary block and launch options used on a GPU."""
    cuda = torch.device("cuda")
    block, launch = triton_sampling.default_block_v(cuda), triton_sampling.launch_options(cuda)
    position = dict(HAS_TOPK=not greedy, HAS_TOPP=not greedy, GREEDY=greedy, BLOCK_V=block, NP=triton_sampling.N_PIVOTS)
    compile_for_h100(triton_sampling._position_kernel, position, launch, SAMPLING_POINTERS)
    compile_for_h100(triton_sampling._emit_kernel, dict(GREEDY=greedy, BLOCK_V=block, BLOCK_K=4), launch,
                     SAMPLING_POINTERS)
