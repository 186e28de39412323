"""Triton kernels of the decode step, each with a small Python launcher.

Batch-1 decode reads every weight once per token, so it is bound by memory bandwidth: the 4-bit
GEMV reads packed weights row-contiguously and applies each group's scale and offset after the
dot product (sum_k (q*s + m) x = s * sum_k q x + m * sum_k x). Attention reads the KV cache only
up to the current length, which the kernel takes from a device tensor, so a CUDA graph captured
once serves every position.

Under TRITON_INTERPRET=1 the same kernels run on the CPU (the tests do that).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Rows

# ---- 4-bit matrix-vector product ------------------------------------------------------------


@triton.jit
def _nibble(words, i: tl.constexpr):
    """Nibble i of each int32 word as float32 0..15, without an int-to-float conversion
    instruction (quarter rate on these GPUs): OR-ing q into the mantissa of 2**23 gives
    exactly 2**23 + q, and one subtraction leaves q."""
    return (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _w4_dot(words_ptr, scales_ptr, offsets_ptr, x_ptr, rows, row_mask, group0, x_sums,
            K: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
    """Partial dot products over BLOCK_G groups for each row: (BLOCK_N,) float32."""
    WORDS: tl.constexpr = GROUP // 8
    groups = tl.arange(0, BLOCK_G)
    word = tl.arange(0, WORDS)
    group_mask = (group0 + groups) < K // GROUP
    offsets = rows[:, None, None] * (K // 8) + (group0 + groups)[None, :, None] * WORDS + word[None, None, :]
    mask = row_mask[:, None, None] & group_mask[None, :, None]
    words = tl.load(words_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first")
    products = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        # nibble i of the words of a group multiplies a contiguous run of x
        x = tl.load(x_ptr + (group0 + groups)[:, None] * GROUP + i * WORDS + word[None, :], mask=group_mask[:, None], other=0.0)
        products += _nibble(words, i) * x.to(tl.float32)[None, :, :]
    dots = tl.sum(products, 2)
    parameter_offsets = rows[:, None] * (K // GROUP) + group0 + groups[None, :]
    parameter_mask = row_mask[:, None] & group_mask[None, :]
    scale = tl.load(scales_ptr + parameter_offsets, mask=parameter_mask, other=0.0).to(tl.float32)
    offset = tl.load(offsets_ptr + parameter_offsets, mask=parameter_mask, other=0.0).to(tl.float32)
    return tl.sum(scale * dots + offset * x_sums[None, :], 1)


@triton.jit
def _w4_gemv_kernel(
    x_ptr, packed_ptr, scales_ptr, offsets_ptr, out_ptr, residual_ptr,
    N_OUT,
    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """out[n] = sum_k W[n, k] x[k] for BLOCK_N rows n of this program, BLOCK_G groups a step.

    GATED: W stacks gate rows then up rows (2 * N_OUT rows); out[n] = silu(gate . x) * (up . x).
    ADD_RESIDUAL: out[n] += residual[n].
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N_OUT
    groups = tl.arange(0, BLOCK_G)
    within = tl.arange(0, GROUP)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for group0 in range(0, K // GROUP, BLOCK_G):
        k = (group0 + groups)[:, None] * GROUP + within[None, :]
        x_sums = tl.sum(tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32), 1)
        acc += _w4_dot(packed_ptr, scales_ptr, offsets_ptr, x_ptr, rows, row_mask, group0, x_sums,
                       K=K, GROUP=GROUP, BLOCK_G=BLOCK_G)  # fmt: skip
        if GATED:
            acc_up += _w4_dot(packed_ptr, scales_ptr, offsets_ptr, x_ptr, rows + N_OUT, row_mask, group0, x_sums,
                              K=K, GROUP=GROUP, BLOCK_G=BLOCK_G)  # fmt: skip
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if ADD_RESIDUAL:
        acc += tl.load(residual_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


# (rows per program, groups per step, warps): the candidates FastLlama.tune_gemv times per shape
GEMV_CONFIGS = [
    (block_n, block_g, warps)
    for block_n in (1, 2, 4, 8, 16)
    for block_g in (1, 2, 4, 8)
    for warps in (1, 2, 4)
    if block_n * block_g <= 32
]
DEFAULT_GEMV_CONFIG = (4, 2, 1)
# The short list tuned at start-up (the full list takes minutes of Triton compiles).
QUICK_GEMV_CONFIGS = [(1, 2, 1), (1, 4, 1), (2, 2, 1), (2, 4, 1), (2, 8, 1), (4, 2, 1), (4, 4, 1), (4, 4, 2), (4, 8, 2), (8, 2, 2), (8, 4, 2), (16, 2, 4)]


def w4_gemv(
    x: torch.Tensor,
    weight: Int4Weight,
    out: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    gated: bool = False,
    config: tuple[int, int, int] = DEFAULT_GEMV_CONFIG,
) -> torch.Tensor:
    """x (K,) fp16 -> (N,) [gated: (N/2,)]; `out` may alias `residual`."""
    n_out = weight.out_features // 2 if gated else weight.out_features
    if out is None:
        out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    block_n, block_g, warps = config
    grid = (triton.cdiv(n_out, block_n),)
    _w4_gemv_kernel[grid](
        x, weight.packed.view(torch.int32), weight.scales, weight.offsets, out, residual if residual is not None else out,
        n_out,
        K=weight.in_features, GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_G=block_g,
        GATED=gated, ADD_RESIDUAL=residual is not None,
        num_warps=warps,
    )  # fmt: skip
    return out


# ---- int8 GEMV (the LM head of a 4-bit model) ------------------------------------------------


@triton.jit
def _i8_gemv_kernel(x_ptr, values_ptr, scales_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    _i8_gemv_kernel[(triton.cdiv(n, block_n),)](x, weight.values, weight.scales, out, n,
                                                K=k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)  # fmt: skip
    return out


# ---- dequantization for prefill (many tokens: dequantize, then one cuBLAS GEMM) --------------


@triton.jit
def _w4_dequant_kernel(words_ptr, scales_ptr, offsets_ptr, out_ptr, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One group of BLOCK_N rows per program."""
    WORDS: tl.constexpr = GROUP // 8
    row_block = tl.program_id(0)
    g = tl.program_id(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    word = tl.arange(0, WORDS)
    words = tl.load(words_ptr + rows[:, None] * (K // 8) + g * WORDS + word[None, :])
    scale = tl.load(scales_ptr + rows * (K // GROUP) + g).to(tl.float32)[:, None]
    offset = tl.load(offsets_ptr + rows * (K // GROUP) + g).to(tl.float32)[:, None]
    for i in tl.static_range(8):
        values = _nibble(words, i) * scale + offset
        tl.store(out_ptr + rows[:, None] * K + g * GROUP + i * WORDS + word[None, :], values.to(out_ptr.dtype.element_ty))


def w4_dequantize(weight: Int4Weight, out: torch.Tensor) -> torch.Tensor:
    """Write the fp16 weight into `out` (N, K), e.g. a scratch buffer reused by every layer."""
    n, k = weight.out_features, weight.in_features
    block_n = 16 if n % 16 == 0 else 1
    grid = (n // block_n, k // weight.group_size)
    _w4_dequant_kernel[grid](weight.packed.view(torch.int32), weight.scales, weight.offsets, out,
                             K=k, GROUP=weight.group_size, BLOCK_N=block_n)  # fmt: skip
    return out


# ---- RMSNorm --------------------------------------------------------------------------------


@triton.jit
def _rmsnorm_kernel(x_ptr, weight_ptr, out_ptr, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, 0) / H
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
    y = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, H) or (H,) -> same shape."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    out = torch.empty_like(x) if out is None else out
    _rmsnorm_kernel[(rows,)](x, weight, out, hidden, eps, BLOCK=triton.next_power_of_2(hidden))
    return out


# ---- rotary embedding + KV cache write ------------------------------------------------------


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, inv_freq_ptr,
    attention_scaling, max_tokens,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One program per (token, head) of the fused qkv row: rotate q and k (rotate-half
    convention, as transformers' Llama), write q to q_out and k, v into the cache at the token's
    position."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    position = tl.load(positions_ptr + token)
    half = tl.arange(0, HEAD_DIM // 2)
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + half)
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling
    row = qkv_ptr + token * (N_Q_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
    if head < N_Q_HEADS:
        src = row + head * HEAD_DIM
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        dst = q_out_ptr + (token * N_Q_HEADS + head) * HEAD_DIM
        tl.store(dst + half, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HEAD_DIM // 2 + half, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty))
    else:
        kv_head = head - N_Q_HEADS
        src = row + (N_Q_HEADS + kv_head) * HEAD_DIM
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        slot = (kv_head * max_tokens + position) * HEAD_DIM
        tl.store(k_cache_ptr + slot + half, (x1 * cos - x2 * sin).to(k_cache_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + slot + HEAD_DIM // 2 + half, (x2 * cos + x1 * sin).to(k_cache_ptr.dtype.element_ty))
        v_src = row + (N_Q_HEADS + N_KV_HEADS + kv_head) * HEAD_DIM
        full = tl.arange(0, HEAD_DIM)
        tl.store(v_cache_ptr + slot + full, tl.load(v_src + full))


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
) -> torch.Tensor:
    """qkv (M, (Hq + 2 Hkv) D) -> rotated q (M, Hq, D); k, v written to caches (Hkv, T, D)."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    _rope_kv_kernel[(tokens, n_q_heads + n_kv_heads)](
        qkv, q_out, k_cache, v_cache, positions, inv_freq, attention_scaling, k_cache.shape[1],
        N_Q_HEADS=n_q_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim,
    )  # fmt: skip
    return q_out


# ---- decode attention: one query token against the cache up to its length -----------------
# Flash-decoding: SPLIT_SIZE-key slices of every head run in parallel (one head alone would
# keep one SM busy), then a second kernel merges the slices' softmax statistics.

SPLIT_SIZE = 128


@triton.jit
def _decode_attention_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, partial_ptr, stats_ptr, length_ptr, sm_scale,
    MAX_TOKENS: tl.constexpr, SPLITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = head // GROUP_SIZE
    length = tl.load(length_ptr)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + head * HEAD_DIM + dims).to(tl.float32) * sm_scale
    running_max = tl.full((), -float("inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    base = kv_head * MAX_TOKENS * HEAD_DIM
    SPLIT_LEN: tl.constexpr = (MAX_TOKENS + SPLITS - 1) // SPLITS
    first = split * SPLIT_LEN
    # Static trip count: one compiled kernel and one captured graph serve every length; blocks
    # past `length` are skipped without touching memory.
    for offset in range(0, SPLIT_LEN, BLOCK_T):
        start = first + offset
        if start < length:
            t = start + tl.arange(0, BLOCK_T)
            mask = (t < length) & (t < first + SPLIT_LEN)
            offsets = base + t[:, None] * HEAD_DIM + dims[None, :]
            k = tl.load(k_cache_ptr + offsets, mask=mask[:, None], other=0.0).to(tl.float32)
            scores = tl.where(mask, tl.sum(k * q[None, :], 1), -float("inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 0))
            correction = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max)
            v = tl.load(v_cache_ptr + offsets, mask=mask[:, None], other=0.0).to(tl.float32)
            acc = acc * correction + tl.sum(p[:, None] * v, 0)
            running_sum = running_sum * correction + tl.sum(p, 0)
            running_max = new_max
    slot = head * SPLITS + split
    tl.store(partial_ptr + slot * HEAD_DIM + dims, acc)
    tl.store(stats_ptr + slot * 2, running_max)
    tl.store(stats_ptr + slot * 2 + 1, running_sum)


@triton.jit
def _decode_attention_merge_kernel(partial_ptr, stats_ptr, out_ptr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    head = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    maxima = tl.load(stats_ptr + (head * SPLITS + splits) * 2)
    sums = tl.load(stats_ptr + (head * SPLITS + splits) * 2 + 1)
    overall = tl.max(maxima, 0)  # split 0 always holds the first key, so this is finite
    weights = tl.exp(maxima - overall)  # empty splits: exp(-inf) = 0
    partial = tl.load(partial_ptr + (head * SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights * sums, 0)
    tl.store(out_ptr + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def attention_workspace(n_heads: int, head_dim: int, max_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    splits = triton.next_power_of_2(max(1, max_tokens // SPLIT_SIZE) + 1) // 2  # a power of two
    return (torch.zeros(n_heads, splits, head_dim, dtype=torch.float32, device=device),
            torch.zeros(n_heads, splits, 2, dtype=torch.float32, device=device))  # fmt: skip


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor, out: torch.Tensor,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (Hq, D); caches (Hkv, T, D); length: int32 device tensor (1,) -> out (Hq, D)."""
    n_heads, head_dim = q.shape
    max_tokens = k_cache.shape[1]
    partial, stats = workspace or attention_workspace(n_heads, head_dim, max_tokens, q.device)
    splits = partial.shape[1]
    _decode_attention_split_kernel[(n_heads, splits)](
        q, k_cache, v_cache, partial, stats, length, head_dim**-0.5,
        MAX_TOKENS=max_tokens, SPLITS=splits, GROUP_SIZE=n_heads // k_cache.shape[0], HEAD_DIM=head_dim,
        BLOCK_T=min(64, triton.next_power_of_2(triton.cdiv(max_tokens, splits))), num_warps=4,
    )  # fmt: skip
    _decode_attention_merge_kernel[(n_heads,)](partial, stats, out, SPLITS=splits, HEAD_DIM=head_dim)
    return out
