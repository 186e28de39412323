"""Triton kernels of the decode step, each with a small Python launcher.

Batch-1 decode reads every weight once per token, so it is bound by memory bandwidth and, for
4-bit weights, by the instructions that unpack them: the 4-bit GEMV reads packed weights
row-contiguously and applies each group's scale and offset after the dot product
(sum_k (q*s + m) x = s * sum_k q x + m * sum_k x); bench/gemv_sass.py counts its instructions
per weight. Attention reads the KV cache only up to the current length, which the kernel takes
from a device tensor, so a CUDA graph captured once serves every position. On Hopper every
kernel is launched with programmatic dependent launch (below).

Under TRITON_INTERPRET=1 the same kernels run on the CPU (the tests do that).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Rows

# ---- launch ordering: programmatic dependent launch (Hopper and later) ------------------
# A decode step is ~300 short kernels; between two of them the GPU drains and refills. With PDL
# a kernel is launched while its predecessor still runs: it loads what no earlier kernel writes
# (its weights) and then waits (griddepcontrol.wait) for everything before it to finish and be
# visible. Every kernel here launched with PDL waits before it touches activations, so the
# ordering of the stream is kept; kernels launched without it (PyTorch's) serialise as usual.


def pdl_enabled(device: torch.device) -> bool:
    """Launch with PDL on sm_90+ unless NANOVLM_PDL=0 (and never under TRITON_INTERPRET)."""
    return device.type == "cuda" and _pdl_on_cuda_device(device.index)


@functools.lru_cache
def _pdl_on_cuda_device(index: int | None) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("NANOVLM_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def _launch_options(device: torch.device) -> dict:
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@functools.lru_cache
def _multiprocessor_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 2 elsewhere (the interpreter), so a persistent grid still loops."""
    return _multiprocessor_count(device.index) if device.type == "cuda" else 2


@triton.jit
def _let_next_kernel_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait_for_previous_kernels(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _start_after_previous_kernels(PDL: tl.constexpr):
    """The start of a kernel that loads nothing before the previous kernels' results."""
    _let_next_kernel_start(PDL)
    _wait_for_previous_kernels(PDL)


# ---- 4-bit matrix-vector product ------------------------------------------------------------


@triton.jit
def _nibble(words, i: tl.constexpr):
    """Nibble i of each int32 word as float32 0..15, without an int-to-float conversion
    instruction (quarter rate on these GPUs): OR-ing q into the mantissa of 2**23 gives
    exactly 2**23 + q, and one subtraction leaves q."""
    return (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _one_plus_sixteenth(words, i: tl.constexpr, one_bits):
    """1 + q/16 as float32 for nibble q = bits 4i..4i+3 of each int32 word: q is moved into the
    top four mantissa bits of 1.0 (one shift, one and-or), with no conversion and no subtraction;
    the GEMV folds the 1 and the 1/16 into each group's offset and scale. `one_bits` is 1.0's
    bit pattern passed at run time: as a register operand it lets the and and the or fuse into
    one LOP3 (two immediates would not)."""
    if 4 * i <= 19:
        bits = words << (19 - 4 * i)
    else:
        bits = words >> (4 * i - 19)
    return ((bits & 0x00780000) | one_bits).to(tl.float32, bitcast=True)


# Eight products of one word's nibbles with their inputs, in half2 arithmetic (Hopper issues one
# HFMA2 for two products). Nibble k (bits 4k..4k+3) and nibble k+4 (bits 4k+16..) land with one
# shift in the top mantissa bits of the two halves, and one LOP3 (and, or) makes them the halves
# 0.125 * (1 + q/16); subtracting 0.1875 leaves (q - 8) / 128, exact in fp16. Centring matters:
# fp16 rounds each partial sum relative to its size, and without the subtraction the sums carry
# 0.1875 * sum(x), which the group offset must cancel later: 10x the error (4e-3 against 4e-4
# relative, bench/NOTES.md, run 11). Products are at most |x| / 16, so the four fused
# multiply-adds of each half cannot overflow for any fp16 input. The two halves are added in
# float32. $1: the word; $2..$5: the inputs of nibbles (0, 4), (1, 5), (2, 6), (3, 7) as half2
# pairs.
_DOT8_HALF2_ASM: tl.constexpr = tl.constexpr("""
{
.reg .b32 t, v, acc, centre;
.reg .b16 lo, hi;
.reg .f32 a, b;
mov.b32 centre, 0x32003200;
shl.b32 t, $1, 6;
lop3.b32 v, t, 0x03C003C0, 0x30003000, 0xEA;
sub.rn.f16x2 v, v, centre;
mul.rn.f16x2 acc, v, $2;
shl.b32 t, $1, 2;
lop3.b32 v, t, 0x03C003C0, 0x30003000, 0xEA;
sub.rn.f16x2 v, v, centre;
fma.rn.f16x2 acc, v, $3, acc;
shr.b32 t, $1, 2;
lop3.b32 v, t, 0x03C003C0, 0x30003000, 0xEA;
sub.rn.f16x2 v, v, centre;
fma.rn.f16x2 acc, v, $4, acc;
shr.b32 t, $1, 6;
lop3.b32 v, t, 0x03C003C0, 0x30003000, 0xEA;
sub.rn.f16x2 v, v, centre;
fma.rn.f16x2 acc, v, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 a, lo;
cvt.f32.f16 b, hi;
add.f32 $0, a, b;
}
""")


@triton.jit
def _dot8_half2(words, pair0, pair1, pair2, pair3):
    """sum over the 8 nibbles q of each int32 word of (q - 8) / 128 * x, float32; pair k holds
    the inputs of nibbles k and k+4 as a half2 (int32)."""
    return tl.inline_asm_elementwise(_DOT8_HALF2_ASM, "=r,r,r,r,r,r", [words, pair0, pair1, pair2, pair3],
                                     dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _sum8_half2(pair0, pair1, pair2, pair3):
    """The sum of the eight fp16 inputs in four half2 pairs, added in half2 (as the dot products
    are), the two halves in float32. A half2 sum of four inputs overflows only for inputs above
    16k, where an fp16 model is at its own limit (Llama's largest activations are a few
    thousand); float32 throughout costs 0.3 more instructions per weight (bench/gemv_sass.py)."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 s;
        .reg .b16 lo, hi;
        .reg .f32 a, b;
        add.rn.f16x2 s, $1, $2;
        add.rn.f16x2 s, s, $3;
        add.rn.f16x2 s, s, $4;
        mov.b32 {lo, hi}, s;
        cvt.f32.f16 a, lo;
        cvt.f32.f16 b, hi;
        add.f32 $0, a, b;
        }
        """,
        "=r,r,r,r,r", [pair0, pair1, pair2, pair3], dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _load_input_pairs(x_pairs, k: tl.constexpr, GROUP_WORDS: tl.constexpr, word_mask):
    """The inputs of nibbles k and k+4 of each word slot: one half2 (int32) each, adjacent in x."""
    return tl.load(x_pairs + k * GROUP_WORDS, mask=word_mask, other=0)


@triton.jit
def _load_words(words_ptr, rows, row_mask, word0, word_end, K: tl.constexpr, BLOCK_W: tl.constexpr):
    """Words word0 .. word0+BLOCK_W-1 (those < word_end) of each row: (BLOCK_N, BLOCK_W) int32."""
    words = word0 + tl.arange(0, BLOCK_W)
    mask = row_mask[:, None] & (words < word_end)[None, :]
    return tl.load(
        words_ptr + rows[:, None] * (K // 8) + words[None, :], mask=mask, other=0, eviction_policy="evict_first"
    )


@triton.jit
def _group_sums(dots, x_sums, scales_ptr, offsets_ptr, rows, row_mask, groups, group_mask,
                GROUPS: tl.constexpr, GROUP_WORDS: tl.constexpr, DOT_SCALE: tl.constexpr,
                ZERO_Q: tl.constexpr):  # fmt: skip
    """(BLOCK_N, groups) partial dot products: scale * sum(q x) + offset * sum(x) for each group,
    from dots = sum(v x) per word slot (BLOCK_N, words), where each weight's dot value v is
    (q - ZERO_Q) / DOT_SCALE, and x_sums per word slot."""
    n_groups: tl.constexpr = groups.shape[0]
    group_x = tl.sum(tl.reshape(x_sums, (n_groups, GROUP_WORDS)), 1)
    group_dots = tl.sum(tl.reshape(dots, (dots.shape[0], n_groups, GROUP_WORDS)), 2)
    parameters = rows[:, None] * GROUPS + groups[None, :]
    mask = row_mask[:, None] & group_mask[None, :]
    scale = tl.load(scales_ptr + parameters, mask=mask, other=0.0).to(tl.float32)
    offset = tl.load(offsets_ptr + parameters, mask=mask, other=0.0).to(tl.float32) + ZERO_Q * scale
    return (scale * DOT_SCALE) * group_dots + offset * group_x[None, :]


@triton.jit
def _w4_gemv_kernel(
    x_ptr, packed_ptr, scales_ptr, offsets_ptr, out_ptr,
    N_OUT, one_bits,
    BLOCKS_PER_PROGRAM: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, GATED: tl.constexpr, PARTIALS: tl.constexpr, HALF2: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[n] = sum_k W[n, k] x[k] over this program's share of K (program_id(1) of SPLIT_K),
    BLOCK_W words (8 * BLOCK_W inputs) of each row a step, for BLOCKS_PER_PROGRAM blocks of
    BLOCK_N rows: blocks program_id(0), + num_programs(0), ... (a persistent grid when there are
    fewer programs than blocks: no tail wave, fewer program launches).

    GATED: W stacks gate rows then up rows (2 * N_OUT rows); out[n] = silu(gate . x) * (up . x).
    PARTIALS: out is float32 (SPLIT_K, N_OUT) and share s goes to row s, unrounded, for the next
    kernel to add in a fixed order (rmsnorm(partials=) adds them to the residual stream):
    splitting K gives a matrix of few rows more programs, with no atomics, so every run of the
    same input gives the same bits.

    The tiles are 2-D (rows, words) so that Triton gives each thread 16 contiguous bytes of
    every row it holds and the matching runs of x, with no layout conversion in the loop. The
    next step's words are loaded before this step's arithmetic; ptxas moves those loads to the
    end of the loop body, yet this measured faster than loading at the top of the step, and
    than unrolling or cp.async pipelining (bench/NOTES.md, run 10).
    """
    _let_next_kernel_start(PDL)
    for i in range(BLOCKS_PER_PROGRAM):
        rows = (tl.program_id(0) + i * tl.num_programs(0)) * BLOCK_N + tl.arange(0, BLOCK_N)
        _w4_gemv_rows(x_ptr, packed_ptr, scales_ptr, offsets_ptr, out_ptr, rows, N_OUT, one_bits,
                      K, GROUP, BLOCK_N, BLOCK_W, SPLIT_K, GATED, PARTIALS, HALF2, PDL)  # fmt: skip


@triton.jit
def _w4_gemv_rows(
    x_ptr, packed_ptr, scales_ptr, offsets_ptr, out_ptr, rows, N_OUT, one_bits,
    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, GATED: tl.constexpr, PARTIALS: tl.constexpr, HALF2: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One block of rows of _w4_gemv_kernel."""
    GROUP_WORDS: tl.constexpr = GROUP // 8
    GROUPS: tl.constexpr = K // GROUP
    BLOCK_G: tl.constexpr = BLOCK_W // GROUP_WORDS
    STEPS_PER_SPLIT: tl.constexpr = ((GROUPS + BLOCK_G - 1) // BLOCK_G + SPLIT_K - 1) // SPLIT_K
    row_mask = rows < N_OUT
    first = tl.program_id(1) * (STEPS_PER_SPLIT * BLOCK_G)  # groups first .. last-1
    last = tl.minimum(first + STEPS_PER_SPLIT * BLOCK_G, GROUPS)
    # weights are never written by a kernel: load the first step before waiting for x (the
    # wait returns at once after the first block)
    words = _load_words(packed_ptr, rows, row_mask, first * GROUP_WORDS, last * GROUP_WORDS, K, BLOCK_W)
    up_words = words
    if GATED:
        up_words = _load_words(packed_ptr, rows + N_OUT, row_mask, first * GROUP_WORDS, last * GROUP_WORDS, K, BLOCK_W)
    _wait_for_previous_kernels(PDL)
    word = tl.arange(0, BLOCK_W)
    # nibble i of word slot w multiplies x[x_index + 2 * GROUP_WORDS * (i % 4) + i // 4] (quant/int4.py)
    x_index = (word // GROUP_WORDS) * GROUP + 2 * (word % GROUP_WORDS)
    x_pair_index = (word // GROUP_WORDS) * (GROUP // 2) + word % GROUP_WORDS  # x_index // 2, visibly contiguous
    # a weight's dot value: (q - 8) / 128 in half2, 1 + q/16 = (q + 16) / 16 in float32
    DOT_SCALE: tl.constexpr = 128.0 if HALF2 else 16.0
    ZERO_Q: tl.constexpr = 8.0 if HALF2 else -16.0
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for step in range(STEPS_PER_SPLIT):
        group0 = first + step * BLOCK_G
        next_words = _load_words(
            packed_ptr, rows, row_mask, (group0 + BLOCK_G) * GROUP_WORDS, last * GROUP_WORDS, K, BLOCK_W
        )
        next_up_words = next_words
        if GATED:
            next_up_words = _load_words(packed_ptr, rows + N_OUT, row_mask, (group0 + BLOCK_G) * GROUP_WORDS,
                                        last * GROUP_WORDS, K, BLOCK_W)  # fmt: skip
        word_mask = group0 * GROUP_WORDS + word < last * GROUP_WORDS
        dots = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        dots_up = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        x_sums = tl.zeros((BLOCK_W,), dtype=tl.float32)
        if HALF2:
            x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + group0 * (GROUP // 2) + x_pair_index
            pair0 = _load_input_pairs(x_pairs, 0, GROUP_WORDS, word_mask)
            pair1 = _load_input_pairs(x_pairs, 1, GROUP_WORDS, word_mask)
            pair2 = _load_input_pairs(x_pairs, 2, GROUP_WORDS, word_mask)
            pair3 = _load_input_pairs(x_pairs, 3, GROUP_WORDS, word_mask)
            x_sums = _sum8_half2(pair0, pair1, pair2, pair3)
            dots = _dot8_half2(words, pair0[None, :], pair1[None, :], pair2[None, :], pair3[None, :])
            if GATED:
                dots_up = _dot8_half2(up_words, pair0[None, :], pair1[None, :], pair2[None, :], pair3[None, :])
        else:
            for i in tl.static_range(8):
                x_offset = 2 * GROUP_WORDS * (i % 4) + i // 4
                x = tl.load(x_ptr + group0 * GROUP + x_index + x_offset, mask=word_mask, other=0.0).to(tl.float32)
                x_sums += x
                dots += _one_plus_sixteenth(words, i, one_bits) * x[None, :]
                if GATED:
                    dots_up += _one_plus_sixteenth(up_words, i, one_bits) * x[None, :]
        groups = group0 + tl.arange(0, BLOCK_G)
        group_mask = groups < last
        acc += _group_sums(
            dots,
            x_sums,
            scales_ptr,
            offsets_ptr,
            rows,
            row_mask,
            groups,
            group_mask,
            GROUPS,
            GROUP_WORDS,
            DOT_SCALE,
            ZERO_Q,
        )
        if GATED:
            acc_up += _group_sums(dots_up, x_sums, scales_ptr, offsets_ptr, rows + N_OUT, row_mask, groups, group_mask,
                                  GROUPS, GROUP_WORDS, DOT_SCALE, ZERO_Q)  # fmt: skip
        words = next_words
        up_words = next_up_words
    total = tl.sum(acc, 1)
    if GATED:
        total = total / (1.0 + tl.exp(-total)) * tl.sum(acc_up, 1)
    if PARTIALS:
        tl.store(out_ptr + tl.program_id(1) * N_OUT + rows, total, mask=row_mask)
    else:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)


ONE_BITS = 0x3F800000  # 1.0f

# (rows per block, words of a row per step, warps, K splits, programs per multiprocessor or 0
# for one program per block): the candidates FastLlama.tune_gemv times per shape. Each thread
# holds 16 contiguous bytes (4 words) of every row it holds and the matching input pairs; wide
# steps (512 words: a whole row of K = 4096 at once) put more loads in flight per thread.
GEMV_CONFIGS = [
    (block_n, block_w, warps, split_k, programs)
    for block_n in (1, 2, 4, 8, 16)
    for block_w in (128, 256, 512)
    for warps in (1, 2, 4)
    for split_k in (1, 2, 4)
    for programs in (0, 16, 24, 32)
    if block_n * block_w <= 2048 and (warps < 4 or block_w == 512)
]
DEFAULT_GEMV_CONFIG = (4, 128, 1, 1, 0)
# The short list tuned at start-up (the full list takes minutes of Triton compiles): the
# leaders of the H100 sweeps (bench/NOTES.md, run 11); split configurations only serve
# w4_gemv_partials.
QUICK_GEMV_CONFIGS = [(2, 128, 1, 1, 0), (4, 128, 1, 1, 0), (4, 128, 1, 1, 24), (4, 128, 1, 1, 32), (8, 128, 2, 1, 32),
                      (2, 256, 1, 1, 0), (2, 256, 1, 1, 24), (4, 256, 2, 1, 0), (4, 256, 2, 1, 24), (8, 256, 2, 1, 16),
                      (8, 256, 2, 1, 24), (2, 512, 2, 1, 0), (2, 512, 2, 1, 24), (4, 512, 2, 1, 24), (4, 512, 4, 1, 0),
                      (4, 512, 4, 1, 24), (8, 128, 1, 2, 0), (8, 128, 1, 4, 0), (8, 128, 1, 4, 16), (8, 128, 1, 4, 32),
                      (16, 128, 1, 4, 24), (4, 256, 1, 2, 16), (4, 256, 2, 2, 16), (8, 256, 2, 2, 0),
                      (8, 256, 2, 2, 16)]  # fmt: skip


def w4_gemv(
    x: torch.Tensor,
    weight: Int4Weight,
    out: torch.Tensor | None = None,
    *,
    gated: bool = False,
    config: tuple[int, ...] = DEFAULT_GEMV_CONFIG,
) -> torch.Tensor:
    """x (K,) fp16 -> (N,) [gated: (N/2,)]. The config's K split must be 1 (w4_gemv_partials
    splits K)."""
    n_out = weight.out_features // 2 if gated else weight.out_features
    if out is None:
        out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    if config[3] != 1:
        raise ValueError("w4_gemv does not split K: use w4_gemv_partials")
    _launch_w4_gemv(x, weight, out, gated, config, partials=False)
    return out


def w4_gemv_partials(
    x: torch.Tensor, weight: Int4Weight, partials: torch.Tensor, config: tuple[int, ...]
) -> torch.Tensor:
    """x (K,) fp16 -> partials (S, N) float32 with S = the config's K split: the products of
    the S shares of K; rmsnorm(partials=) adds them to the residual stream."""
    if partials.dtype != torch.float32 or tuple(partials.shape) != (config[3], weight.out_features):
        expected = (config[3], weight.out_features)
        raise ValueError(f"partials must be float32 {expected}, got {partials.dtype} {tuple(partials.shape)}")
    _launch_w4_gemv(x, weight, partials, False, config, partials=True)
    return partials


def _launch_w4_gemv(x, weight: Int4Weight, out, gated: bool, config, *, partials: bool) -> None:
    n_out = weight.out_features // 2 if gated else weight.out_features
    block_n, block_w, warps, split_k, programs_per_multiprocessor = config
    block_w = max(block_w, weight.group_size // 8)  # whole groups a step
    blocks = triton.cdiv(n_out, block_n)
    programs = blocks
    if programs_per_multiprocessor:
        programs = min(blocks, programs_per_multiprocessor * _multiprocessors(x.device))
    _w4_gemv_kernel[(programs, split_k)](
        x, weight.packed.view(torch.int32), weight.scales, weight.offsets, out, n_out, ONE_BITS,
        BLOCKS_PER_PROGRAM=triton.cdiv(blocks, programs), K=weight.in_features, GROUP=weight.group_size,
        BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split_k, GATED=gated, PARTIALS=partials,
        HALF2=x.device.type == "cuda", num_warps=warps, **_launch_options(x.device),
    )  # fmt: skip


# ---- int8 GEMV (the LM head of a 4-bit model) ------------------------------------------------


@triton.jit
def _i8_gemv_kernel(x_ptr, values_ptr, scales_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    _start_after_previous_kernels(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(values_ptr + rows[:, None] * K + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (acc * scale).to(out_ptr.dtype.element_ty), mask=row_mask)


def i8_gemv(x: torch.Tensor, weight: Int8Rows, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (K,) fp16 -> (N,) = W x for a row-wise int8 W."""
    n, k = weight.out_features, weight.in_features
    if out is None:
        out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_n, block_k = 16, min(512, triton.next_power_of_2(k))
    _i8_gemv_kernel[(triton.cdiv(n, block_n),)](x, weight.values, weight.scales, out, n, K=k, BLOCK_N=block_n, BLOCK_K=block_k,
                                                num_warps=4, **_launch_options(x.device))  # fmt: skip
    return out


# ---- dequantization for prefill (many tokens: dequantize, then one cuBLAS GEMM) --------------


@triton.jit
def _w4_dequant_kernel(
    words_ptr, scales_ptr, offsets_ptr, out_ptr, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr
):
    """One group of BLOCK_N rows per program."""
    WORDS: tl.constexpr = GROUP // 8
    row_block = tl.program_id(0)
    g = tl.program_id(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    word = tl.arange(0, WORDS)
    words = tl.load(words_ptr + rows[:, None] * (K // 8) + g * WORDS + word[None, :])
    scale = tl.load(scales_ptr + rows * (K // GROUP) + g).to(tl.float32)[:, None]
    offset = tl.load(offsets_ptr + rows * (K // GROUP) + g).to(tl.float32)[:, None]
    pair = tl.arange(0, 2 * WORDS)
    for k in tl.static_range(4):  # nibbles k and k+4 of word w: inputs 2 * (k * WORDS + w) and the next
        values = tl.reshape(tl.join(_nibble(words, k), _nibble(words, k + 4)), (BLOCK_N, 2 * WORDS)) * scale + offset
        tl.store(
            out_ptr + rows[:, None] * K + g * GROUP + k * 2 * WORDS + pair[None, :], values.to(out_ptr.dtype.element_ty)
        )


def w4_dequantize(weight: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """Write the fp16 weight into `out` (N, K), e.g. a scratch buffer reused by every layer."""
    n, k = weight.out_features, weight.in_features
    block_n = 16 if n % 16 == 0 else 1
    grid = (n // block_n, k // weight.group_size)
    _w4_dequant_kernel[grid](weight.packed.view(torch.int32), weight.scales, weight.offsets, out,
                             K=k, GROUP=weight.group_size, BLOCK_N=block_n)  # fmt: skip
    return out


# ---- the ends of a decode step: the token's embedding in, the greedy token out -------------
# One kernel each instead of PyTorch's gather, casts and scaling (int8 rows), and argmax, copy
# and two increments: every launch in the captured step costs a few microseconds of drain and
# refill, and PyTorch's kernels also break the PDL chain.


@triton.jit
def _embed_token_kernel(token_ptr, values_ptr, scales_ptr, out_ptr, H, SCALED: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):  # fmt: skip
    _start_after_previous_kernels(PDL)
    token = tl.load(token_ptr)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    row = tl.load(values_ptr + token * H + cols, mask=mask, other=0)
    if SCALED:  # as Int8Rows.rows: float32 product, rounded once
        row = row.to(tl.float32) * tl.load(scales_ptr + token).to(tl.float32)
    tl.store(out_ptr + cols, row.to(out_ptr.dtype.element_ty), mask=mask)


def embed_token(token: torch.Tensor, table: Int8Rows | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (H,) = the embedding of token (a (1,) device tensor) in an fp16 or int8-row table."""
    values, scales = (table.values, table.scales) if isinstance(table, Int8Rows) else (table, table)
    hidden = values.shape[1]
    _embed_token_kernel[(1,)](token, values, scales, out, hidden, SCALED=isinstance(table, Int8Rows),
                              BLOCK=triton.next_power_of_2(hidden), **_launch_options(out.device))  # fmt: skip
    return out


@triton.jit
def _greedy_advance_kernel(logits_ptr, mask_ptr, token_ptr, position_ptr, length_ptr, V: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    _start_after_previous_kernels(PDL)
    best_value = tl.full((), -float("inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    for start in tl.static_range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        logits = tl.load(logits_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        # The token mask (constrained decoding): bit c % 32 of word c // 32. All ones when
        # unconstrained, so the choice is the plain argmax, bit for bit.
        words = tl.load(mask_ptr + cols // 32, mask=cols < V, other=0)
        allowed = ((words >> (cols % 32)) & 1) != 0
        logits = tl.where(allowed, logits, -float("inf"))
        value, index = tl.max(logits, 0, return_indices=True, return_indices_tie_break_left=True)
        better = value > best_value  # strictly: the first of equal maxima wins, as torch.argmax
        best_index = tl.where(better, start + index, best_index)
        best_value = tl.where(better, value, best_value)
    tl.store(token_ptr, best_index.to(token_ptr.dtype.element_ty))
    tl.store(position_ptr, tl.load(position_ptr) + 1)
    tl.store(length_ptr, tl.load(length_ptr) + 1)


def greedy_advance(logits: torch.Tensor, token_mask: torch.Tensor, token: torch.Tensor, position: torch.Tensor,
                   length: torch.Tensor) -> None:  # fmt: skip
    """token = argmax(logits) over the tokens `token_mask` allows (int32 words, bit c % 32 of
    word c // 32 for token c; the first of equal maxima); position += 1; length += 1 (all (1,)
    device tensors): the end of a captured decode step."""
    vocab = logits.numel()
    assert token_mask.dtype == torch.int32 and token_mask.numel() * 32 >= vocab
    _greedy_advance_kernel[(1,)](logits, token_mask, token, position, length, V=vocab,
                                 BLOCK=min(32768, triton.next_power_of_2(vocab)), num_warps=16,
                                 **_launch_options(logits.device))  # fmt: skip


# ---- RMSNorm --------------------------------------------------------------------------------


RMSNORM_WARPS = 4


@triton.jit
def _norm_kernel(x_ptr, partials_ptr, weight_ptr, bias_ptr, out_ptr, H, eps, SPLITS: tl.constexpr,
                 BLOCK: tl.constexpr, LAYER_NORM: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    _let_next_kernel_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # never written by a kernel
    if LAYER_NORM:
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    _wait_for_previous_kernels(PDL)
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0)
    if SPLITS > 0:  # the residual stream takes the GEMV's shares, in a fixed order, and stays fp16
        total = x.to(tl.float32)
        for split in tl.static_range(SPLITS):
            total += tl.load(partials_ptr + split * H + cols, mask=mask, other=0.0)
        x = total.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * H + cols, x, mask=mask)
    x = x.to(tl.float32)
    if LAYER_NORM:
        # torch's LayerNorm (StableLM): mean and variance in float32, scaled and shifted there too.
        centred = tl.where(mask, x - tl.sum(x, 0) / H, 0.0)
        variance = tl.sum(centred * centred, 0) / H
        y = centred * tl.rsqrt(variance + eps) * w + b
    else:
        variance = tl.sum(x * x, 0) / H
        # transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
        y = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
            partials: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x (M, H) or (H,) -> same shape. partials (S, H) float32 (one row x only): first
    x += sum of the partials, in place. With `bias`, LayerNorm (weight and bias) instead of
    RMSNorm."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    if partials is not None and (rows != 1 or partials.dim() != 2 or partials.shape[1] != hidden):
        raise ValueError(f"partials (S, {hidden}) are added to one row")
    out = torch.empty_like(x) if out is None else out
    splits = 0 if partials is None else partials.shape[0]
    _norm_kernel[(rows,)](x, partials if partials is not None else x, weight, bias if bias is not None else weight,
                          out, hidden, eps, SPLITS=splits, BLOCK=triton.next_power_of_2(hidden),
                          LAYER_NORM=bias is not None, num_warps=RMSNORM_WARPS, **_launch_options(x.device))  # fmt: skip
    return out


# ---- rotary embedding + KV cache write ------------------------------------------------------


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, positions_stride, sections_ptr, inv_freq_ptr,
    attention_scaling, max_tokens, start, start_ptr,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr,
    ROTARY_DIM: tl.constexpr, SLOT_FROM_POSITION: tl.constexpr, START_ON_DEVICE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (token, head) of the fused qkv row: rotate q and k (rotate-half
    convention over the first ROTARY_DIM dimensions, as transformers' Llama, Qwen and StableLM),
    write q to q_out and k, v into the cache at slot start + token (or at the token's position);
    START_ON_DEVICE: start is read from start_ptr (a prefill graph that serves every start).

    Each frequency takes its position from one row of positions (S, L): row sections[f]. One
    row for plain RoPE; Qwen's multimodal RoPE has three (time, height, width)."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    _start_after_previous_kernels(PDL)
    dims = tl.arange(0, HEAD_P2)  # HEAD_DIM rounded up to a power of two (StableLM's is 80)
    frequency = dims % (ROTARY_DIM // 2)
    section = tl.load(sections_ptr + frequency)
    position = tl.load(positions_ptr + section * positions_stride + token)
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + frequency)
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling
    in_head = dims < HEAD_DIM
    row = qkv_ptr + token * (N_Q_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
    if head < N_Q_HEADS:
        rotated = _rotate(row + head * HEAD_DIM, dims, cos, sin, ROTARY_DIM, HEAD_DIM)
        dst = q_out_ptr + (token * N_Q_HEADS + head) * HEAD_DIM
        tl.store(dst + dims, rotated.to(q_out_ptr.dtype.element_ty), mask=in_head)
    else:
        kv_head = head - N_Q_HEADS
        rotated = _rotate(row + (N_Q_HEADS + kv_head) * HEAD_DIM, dims, cos, sin, ROTARY_DIM, HEAD_DIM)
        if SLOT_FROM_POSITION:
            slot_index = tl.load(positions_ptr + token)
        elif START_ON_DEVICE:
            slot_index = tl.load(start_ptr) + token
        else:
            slot_index = start + token
        slot = (kv_head * max_tokens + slot_index) * HEAD_DIM
        tl.store(k_cache_ptr + slot + dims, rotated.to(k_cache_ptr.dtype.element_ty), mask=in_head)
        v_src = row + (N_Q_HEADS + N_KV_HEADS + kv_head) * HEAD_DIM
        tl.store(v_cache_ptr + slot + dims, tl.load(v_src + dims, mask=in_head), mask=in_head)


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor,
    n_q_heads: int,
    n_kv_heads: int,
    *,
    start: int | torch.Tensor | None = None,
    sections: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv (M, (Hq + 2 Hkv) D) -> rotated q (M, Hq, D); k, v written to caches (Hkv, T, D).

    positions: int32 (M,), or (S, M) with a row per section (a view with any row stride);
    sections: int32 (R/2,), the row of each frequency (default all 0); R = 2 * inv_freq's
    length, the rotated dimensions (D, or fewer: partial rotary). k and v go to cache slots
    start..start+M-1 (`start` an int, or an int32 device tensor (1,) read by the kernel), or,
    without `start`, to slot positions[0][i]."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    rows = positions if positions.dim() == 2 else positions[None]
    if sections is None:
        sections = torch.zeros(inv_freq.numel(), dtype=torch.int32, device=qkv.device)
    on_device = isinstance(start, torch.Tensor)
    _rope_kv_kernel[(tokens, n_q_heads + n_kv_heads)](
        qkv, q_out, k_cache, v_cache, rows, rows.stride(0), sections, inv_freq, attention_scaling, k_cache.shape[1],
        0 if on_device or start is None else start, start if on_device else rows, N_Q_HEADS=n_q_heads,
        N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim, HEAD_P2=triton.next_power_of_2(head_dim),
        ROTARY_DIM=2 * inv_freq.numel(), SLOT_FROM_POSITION=start is None, START_ON_DEVICE=on_device,
        **_launch_options(qkv.device),
    )  # fmt: skip
    return q_out


# ---- decode attention: one query token against the cache up to its length -----------------
# Flash-decoding: SPLIT_SIZE-key slices of every head run in parallel (one head alone would
# keep one SM busy); the last slice of a head to finish merges the slices' softmax statistics
# (a counter per head), in a fixed order, so one kernel does it all with no extra launch.

# One warp per 32-key slice: measured on an H100 against 16/64/128 keys and 2/4 warps (32 layers
# of 651 keys: 261 us, against 421 us for 64 keys on 4 warps): a single warp reduces without
# shared memory, and more programs keep more loads in flight.
SPLIT_SIZE = 32
ATTENTION_WARPS = 1


@triton.jit
def _rotate(row_ptr, dims, cos, sin, ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotary embedding of one head, float32: the rotate-half convention over its first
    ROTARY_DIM dimensions (all of them but for StableLM's partial rotary), the rest unchanged;
    `dims` may run past HEAD_DIM (a power-of-two range), those lanes are 0."""
    half: tl.constexpr = ROTARY_DIM // 2
    in_head = dims < HEAD_DIM
    rotary = dims < ROTARY_DIM
    x = tl.load(row_ptr + dims, mask=in_head, other=0.0).to(tl.float32)
    partner = tl.load(row_ptr + (dims + half) % ROTARY_DIM, mask=rotary, other=0.0).to(tl.float32)
    return tl.where(rotary, x * cos + tl.where(dims < half, -partner, partner) * sin, x)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, partial_ptr, stats_ptr, counter_ptr, out_ptr, length_ptr, sm_scale,
    position_ptr, rope_offset_ptr, inv_freq_ptr, attention_scaling,
    MAX_TOKENS: tl.constexpr, SPLITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    ROPE_FROM_QKV: tl.constexpr, N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """ROPE_FROM_QKV: q_ptr is the fused qkv row of the new token at position_ptr: q and k are
    rotated here, and the program whose slice holds the position writes k and v into the cache
    before reading its slice (the rotary kernel of the prefill, folded in: one launch fewer).
    The rotation's angle is that of position + rope_offset (Qwen's text after an image runs
    behind its cache slot: rope_deltas); the cache slot is the position."""
    _start_after_previous_kernels(PDL)
    head = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = head // GROUP_SIZE
    length = tl.load(length_ptr)
    dims = tl.arange(0, HEAD_P2)  # HEAD_DIM rounded up to a power of two; the lanes past it are masked
    in_head = dims < HEAD_DIM
    base = kv_head * MAX_TOKENS * HEAD_DIM
    SPLIT_LEN: tl.constexpr = (MAX_TOKENS + SPLITS - 1) // SPLITS
    first = split * SPLIT_LEN
    if ROPE_FROM_QKV:
        position = tl.load(position_ptr)
        rope_position = position + tl.load(rope_offset_ptr)
        angle = rope_position.to(tl.float32) * tl.load(inv_freq_ptr + dims % (ROTARY_DIM // 2))
        cos = tl.cos(angle) * attention_scaling
        sin = tl.sin(angle) * attention_scaling
        # q is rounded to fp16 as the separate rotary kernel stores it
        q = _rotate(q_ptr + head * HEAD_DIM, dims, cos, sin, ROTARY_DIM, HEAD_DIM)
        q = q.to(tl.float16).to(tl.float32) * sm_scale
        if position // SPLIT_LEN == split:
            k_new = _rotate(q_ptr + (N_Q_HEADS + kv_head) * HEAD_DIM, dims, cos, sin, ROTARY_DIM, HEAD_DIM)
            slot = k_cache_ptr + base + position * HEAD_DIM + dims
            tl.store(slot, k_new.to(k_cache_ptr.dtype.element_ty), mask=in_head)
            v_new = tl.load(q_ptr + (N_Q_HEADS + N_KV_HEADS + kv_head) * HEAD_DIM + dims, mask=in_head)
            tl.store(v_cache_ptr + base + position * HEAD_DIM + dims, v_new, mask=in_head)
            tl.debug_barrier()  # the slice below reads them back
    else:
        q = tl.load(q_ptr + head * HEAD_DIM + dims, mask=in_head, other=0.0).to(tl.float32) * sm_scale
    running_max = tl.full((), -float("inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((HEAD_P2,), dtype=tl.float32)
    # Static trip count: one compiled kernel and one captured graph serve every length; blocks
    # past `length` are skipped without touching memory.
    for offset in range(0, SPLIT_LEN, BLOCK_T):
        start = first + offset
        if start < length:
            t = start + tl.arange(0, BLOCK_T)
            mask = (t < length) & (t < first + SPLIT_LEN)
            offsets = base + t[:, None] * HEAD_DIM + dims[None, :]
            both = mask[:, None] & in_head[None, :]
            k = tl.load(k_cache_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + offsets, mask=both, other=0.0).to(tl.float32)
            scores = tl.where(mask, tl.sum(k * q[None, :], 1), -float("inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 0))
            correction = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max)
            acc = acc * correction + tl.sum(p[:, None] * v, 0)
            running_sum = running_sum * correction + tl.sum(p, 0)
            running_max = new_max
    slot = head * SPLITS + split
    tl.store(partial_ptr + slot * HEAD_P2 + dims, acc)
    tl.store(stats_ptr + slot * 2, running_max)
    tl.store(stats_ptr + slot * 2 + 1, running_sum)
    tl.debug_barrier()  # every thread's stores precede the release below
    if tl.atomic_add(counter_ptr + head, 1, sem="acq_rel") == SPLITS - 1:
        # the last slice of this head: the others' results are visible (acquire); merge them
        slots = head * SPLITS + tl.arange(0, SPLITS)
        maxima = tl.load(stats_ptr + slots * 2, cache_modifier=".cg")
        sums = tl.load(stats_ptr + slots * 2 + 1, cache_modifier=".cg")
        overall = tl.max(maxima, 0)  # split 0 always holds the first key, so this is finite
        weights = tl.exp(maxima - overall)  # empty splits: exp(-inf) = 0
        partial = tl.load(partial_ptr + slots[:, None] * HEAD_P2 + dims[None, :], cache_modifier=".cg")
        out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights * sums, 0)
        tl.store(out_ptr + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=in_head)
        tl.store(counter_ptr + head, 0)  # ready for the next call


def attention_workspace(n_heads: int, head_dim: int, max_tokens: int, device, split_size: int = SPLIT_SIZE):
    """Per-slice partial outputs and softmax statistics, and the per-head counters (zeros)."""
    splits = triton.next_power_of_2(max(1, max_tokens // split_size) + 1) // 2  # a power of two
    padded = triton.next_power_of_2(head_dim)
    return (torch.zeros(n_heads, splits, padded, dtype=torch.float32, device=device),
            torch.zeros(n_heads, splits, 2, dtype=torch.float32, device=device),
            torch.zeros(n_heads, dtype=torch.int32, device=device))  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor,
    out: torch.Tensor,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    num_warps: int = ATTENTION_WARPS,
) -> torch.Tensor:
    """q (Hq, D); caches (Hkv, T, D); length: int32 device tensor (1,) -> out (Hq, D)."""
    return _launch_decode_attention(q, q.shape[0], k_cache, v_cache, length, out, workspace, num_warps)


def decode_rope_attention(
    qkv: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
    k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor, out: torch.Tensor, n_q_heads: int,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, num_warps: int = ATTENTION_WARPS,
    rope_offset: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """rope_and_cache then decode_attention in one kernel: qkv ((Hq + 2 Hkv) D,) of the token at
    `position` (int32 device tensor (1,)); its k, v go into the caches; -> out (Hq, D).
    rope_offset (int32 device tensor (1,)): the rotation is that of position + offset."""
    if rope_offset is None:
        rope_offset = torch.zeros(1, dtype=torch.int32, device=qkv.device)
    rope = (position, rope_offset, inv_freq, attention_scaling)
    return _launch_decode_attention(qkv, n_q_heads, k_cache, v_cache, length, out, workspace, num_warps, rope)


def _launch_decode_attention(q, n_heads, k_cache, v_cache, length, out, workspace, num_warps, rope=None):
    n_kv_heads, max_tokens, head_dim = k_cache.shape
    partial, stats, counters = workspace or attention_workspace(n_heads, head_dim, max_tokens, q.device)
    splits = partial.shape[1]
    position, rope_offset, inv_freq, attention_scaling = rope or (length, length, length, 1.0)  # unused without rope
    _decode_attention_kernel[(n_heads, splits)](
        q, k_cache, v_cache, partial, stats, counters, out, length, head_dim**-0.5, position, rope_offset, inv_freq,
        attention_scaling, MAX_TOKENS=max_tokens, SPLITS=splits, GROUP_SIZE=n_heads // n_kv_heads, HEAD_DIM=head_dim,
        HEAD_P2=triton.next_power_of_2(head_dim), ROTARY_DIM=2 * inv_freq.numel() if rope else head_dim,
        BLOCK_T=min(64, triton.next_power_of_2(triton.cdiv(max_tokens, splits))), ROPE_FROM_QKV=rope is not None,
        N_Q_HEADS=n_heads, N_KV_HEADS=n_kv_heads, num_warps=num_warps, **_launch_options(q.device),
    )  # fmt: skip
    return out
