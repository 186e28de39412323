"""4-bit GEMM for prefill (W4A16): out (M, N) = x (M, K) @ W^T with W in quant/int4.py's format.

Many tokens make a product bound by arithmetic, so it runs on the tensor cores through tl.dot.
The weights are dequantized in registers inside the K loop (the idea of Marlin and Machete; no
code of theirs): each step reads one group of 128 inputs of BLOCK_N rows as int32 words (64
bytes a row), turns them into fp16 q * scale + offset and feeds them to tl.dot with the inputs
of BLOCK_M tokens. Nothing is written back to memory but the output, so the GEMM reads 4.25
bits per weight instead of the 4.25 + 16 + 16 of dequantize-into-a-buffer then cuBLAS.

The product is computed transposed, acc (BLOCK_N, BLOCK_M) = W_tile @ x_tile^T: the weights
become the A operand, which Hopper's warpgroup MMA may take from registers (Triton keeps an A
operand that no load produces in registers), and a block of 16 tokens still fills the MMA's
64-row side with weight rows. Triton chooses the MMA instruction from the target: the same
source compiles to mma.sync on sm_80/sm_87 (Jetson Orin) and to wgmma on sm_90; the kernel
uses no TMA, no warp specialisation and nothing else that only Hopper has.

The packing (quant/int4.py) puts nibbles c and c + 4 of a word on two adjacent inputs, and
nibble c of the words of a group on a run of G/4 inputs: a group is four chunks of G/4 inputs,
chunk c holding the pairs (c, c + 4) of every word. The eight nibble tiles of a step are joined
into the (BLOCK_N, G) weight tile in input order (joins and a permutation of dimensions that
each thread holds in registers: no data moves), so each group is one tl.dot of depth G and one
contiguous (G, BLOCK_M) tile of inputs. On sm_90 Triton then keeps the warpgroup MMAs of one
group in flight while the next group is loaded and dequantized; four dots of depth G/4 waited
for each MMA before dequantizing the next chunk (SASS compiled on the CPU, bench/NOTES.md).
On CUDA a pair of weights is made in half2 arithmetic (inline PTX: one shift, one LOP3 that
puts the two nibbles under fp16's exponent of 1024, one HSUB2 that takes the 1024 off,
exactly, one HFMA2 with the scale and offset: four instructions per two weights, the product
and offset rounded once); elsewhere (Triton's interpreter) in float32, rounded to fp16 once,
as the old dequantization kernel does.

Groups of 32, 64 and 128 inputs run (quant/int4.py makes no others); any other group keeps
the dequantize-then-cuBLAS path (w4_gemm_unsupported says why).

Measured on an H200 (bench/NOTES.md, run 13), the GEMM beats dequantize + cuBLAS where the
product is bound by memory and loses where it is bound by arithmetic: FastLlama uses it up to
W4_GEMM_MAX_TOKENS tokens. A stream-K variant (_w4_gemm_stream_k_kernel) is kept for the
sweep, out of the table.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..quant.int4 import Int4Weight
from .kernels import _launch_options, _multiprocessors, _start_after_previous_kernels

# (BLOCK_N weight rows, BLOCK_M tokens, warps, pipeline stages, programs per multiprocessor):
# 0 programs = one program per output tile; n > 0 = stream-K, n programs per SM share the
# tiles' K steps evenly (see _w4_gemm_stream_k_kernel; NANOVLM_W4_STREAM_K=0 turns it off).
W4GemmConfig = tuple[int, int, int, int, int]

# The launch configuration by tokens (M): the first entry whose bound is >= M. From the H200
# sweep in bench/check_gpu.py over W4_GEMM_CANDIDATES at 16, 64, 256, 640 and 2048 tokens, the
# least time summed over LLaVA-7B's four matrices (bench/NOTES.md, run 13); the 128-token entry
# is the second of the 256-token sweep (4% behind, no half-empty token blocks). The same table
# serves every GPU: stages, then tokens a block, are dropped where a GPU has less shared
# memory (fit_stages); a configuration that still fails to launch makes FastLlama fall back to
# dequantize + cuBLAS.
W4_GEMM_TABLE: list[tuple[int, W4GemmConfig]] = [
    (16, (64, 16, 4, 4, 0)),
    (64, (64, 32, 4, 3, 0)),
    (128, (64, 128, 4, 3, 0)),
    (384, (64, 256, 4, 3, 0)),
    (1 << 62, (128, 256, 8, 3, 0)),
]

# FastLlama's prefill uses the GEMM up to this many tokens and dequantize + cuBLAS above. The
# GEMM reads 4.25 bits a weight and nothing else, so where the product is bound by memory it
# wins (H200, a 7B layer's four products: 115 us against 286 at 16 tokens, 165 against 289 at
# 64, 283 against 322 at 256); where it is bound by arithmetic cuBLAS's fp16 GEMM wins (572
# against 503 at 640, 1349 against 1236 at 2048): this kernel's warpgroup MMAs wait for loads
# and dequantization that they do not hide (0.81 of cuBLAS's rate for a layer at 2048 tokens).
# The crossover, interpolated, is near 400 tokens.
W4_GEMM_MAX_TOKENS = 384

# What bench/check_gpu.py sweeps. A warpgroup (4 warps) holds its rows' weights as the MMA's A
# operand in registers (64 a thread for 128 rows) beside the accumulators: 128 rows on 4 warps
# spill from 128 tokens on, 256 rows need 8 warps (sm_90 SASS, compiled on the CPU). Stream-K
# variants of the large tiles, which leave SMs idle when the tiles do not fill whole waves.
W4_GEMM_CANDIDATES: list[W4GemmConfig] = [
    (block_n, block_m, warps, stages, 0)
    for block_n, warps in ((64, 4), (128, 4), (128, 8), (256, 8))
    for block_m in (16, 32, 64, 128, 256)
    for stages in ((2, 3) if block_m == 256 else (3, 4))
    if 8 * 32 * warps <= block_n * block_m <= 128 * 32 * warps
    and not (block_n == 128 and warps == 4 and block_m > 64)
    and stages * block_m * 256 + (stages - 1) * block_n * 64 + 1024 <= 227 * 1024  # shared_memory_bound, G = 128
] + [
    (128, 256, 8, 3, 1),
    (128, 256, 8, 2, 1),
    (128, 128, 8, 3, 1),
    (128, 128, 8, 4, 1),
    (256, 128, 8, 3, 1),
    (64, 128, 4, 3, 2),
    (128, 64, 8, 4, 1),
    (64, 64, 4, 4, 2),
]

GROUPS = (32, 64, 128)  # a group is one tl.dot of that depth; larger ones would hold more registers


def w4_gemm_unsupported(weight: Int4Weight) -> str:
    """ "" when w4_gemm runs this weight, else why not (then dequantize + matmul)."""
    if weight.group_size not in GROUPS:
        return f"group size {weight.group_size} (the 4-bit GEMM runs groups of {GROUPS})"
    return ""


def w4_gemm_config(tokens: int) -> W4GemmConfig:
    for bound, config in W4_GEMM_TABLE:
        if tokens <= bound:
            return config
    return W4_GEMM_TABLE[-1][1]


def shared_memory_bound(config: W4GemmConfig, group: int) -> int:
    """Bytes of shared memory a configuration needs at most: each pipeline stage holds a
    group's inputs of BLOCK_M tokens (fp16), all but one a group's words of BLOCK_N rows."""
    block_n, block_m, _, stages, _ = config
    return stages * block_m * group * 2 + (stages - 1) * block_n * group // 2 + 1024  # + barriers, a margin


def fit_stages(config: W4GemmConfig, group: int, shared_memory: int) -> W4GemmConfig:
    """The configuration with fewer pipeline stages (down to 2), then fewer tokens a block, until
    it fits `shared_memory` bytes (an H100's 227 KB per block hold every table entry; Jetson
    Orin's 163 KB and an A10's 99 KB do not)."""
    block_n, block_m, warps, stages, programs = config
    while shared_memory_bound((block_n, block_m, warps, stages, programs), group) > shared_memory:
        if stages > 2:
            stages -= 1
        elif block_m > 16:
            block_m //= 2
        elif stages > 1:
            stages -= 1
        else:
            break
    return block_n, block_m, warps, stages, programs


@functools.lru_cache
def _shared_memory_per_block(index: int | None) -> int:
    properties = torch.cuda.get_device_properties(index)
    return getattr(properties, "shared_memory_per_block_optin", 0) or 99 * 1024


@triton.jit
def _nibble_pair_half2(words, SHIFT: tl.constexpr, scale2, offset2):
    """Weights of nibbles (SHIFT/4, SHIFT/4 + 4) of each word as two fp16 tensors: one shift
    puts both in the low bits of the word's two halves, one LOP3 keeps them under the exponent
    of 1024 (0x6400: 1024 + q exactly), one HSUB2 takes 1024 off, one HFMA2 applies the
    group's scale and offset (half2 registers holding each twice)."""
    return tl.inline_asm_elementwise(
        f"""
        {{
        .reg .b32 t, v, magic;
        mov.b32 magic, 0x64006400;
        shr.u32 t, $2, {SHIFT};
        lop3.b32 v, t, 0x000F000F, magic, 0xEA;
        sub.rn.f16x2 v, v, magic;
        fma.rn.f16x2 v, v, $3, $4;
        mov.b32 {{$0, $1}}, v;
        }}
        """,
        "=h,=h,r,r,r",
        [words, scale2, offset2],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _nibble_weight(words, SHIFT: tl.constexpr, scale, offset):
    """q * scale + offset in float32 (q from bits SHIFT..SHIFT+3, exact through the 2**23
    trick), rounded to fp16 once: the portable path (and Triton's interpreter)."""
    q = (((words >> SHIFT) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return (q * scale + offset).to(tl.float16)


@triton.jit
def _half2_bits(values):
    """An fp16 vector -> int32 words holding each value in both halves."""
    bits = values.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _dequantize_group(words_at, scales_ptr, offsets_ptr, parameters_at, group, row_mask,
                      BLOCK_N: tl.constexpr, GROUP: tl.constexpr, HALF2: tl.constexpr):  # fmt: skip
    """The (BLOCK_N, GROUP) fp16 weights of one group of inputs, in input order."""
    words = tl.load(words_at + group * (GROUP // 8), mask=row_mask[:, None], other=0)
    scale = tl.load(scales_ptr + parameters_at + group, mask=row_mask, other=0.0)
    offset = tl.load(offsets_ptr + parameters_at + group, mask=row_mask, other=0.0)
    if HALF2:
        scale2 = _half2_bits(scale)[:, None]
        offset2 = _half2_bits(offset)[:, None]
        w0, w4 = _nibble_pair_half2(words, 0, scale2, offset2)
        w1, w5 = _nibble_pair_half2(words, 4, scale2, offset2)
        w2, w6 = _nibble_pair_half2(words, 8, scale2, offset2)
        w3, w7 = _nibble_pair_half2(words, 12, scale2, offset2)
    else:
        scale32 = scale.to(tl.float32)[:, None]
        offset32 = offset.to(tl.float32)[:, None]
        w0 = _nibble_weight(words, 0, scale32, offset32)
        w1 = _nibble_weight(words, 4, scale32, offset32)
        w2 = _nibble_weight(words, 8, scale32, offset32)
        w3 = _nibble_weight(words, 12, scale32, offset32)
        w4 = _nibble_weight(words, 16, scale32, offset32)
        w5 = _nibble_weight(words, 20, scale32, offset32)
        w6 = _nibble_weight(words, 24, scale32, offset32)
        w7 = _nibble_weight(words, 28, scale32, offset32)
    # chunk c (inputs c*G/4 + 2w + j) holds nibble c + 4j of word w: (rows, w, j, c low bit, c high bit)
    chunks = tl.join(tl.join(tl.join(w0, w4), tl.join(w1, w5)), tl.join(tl.join(w2, w6), tl.join(w3, w7)))
    return tl.reshape(tl.permute(chunks, (0, 4, 3, 1, 2)), (BLOCK_N, GROUP))


@triton.jit
def _w4_gemm_groups(acc, x_at, words_at, scales_ptr, offsets_ptr, parameters_at, row_mask, token_mask, first, last,
                    BLOCK_N: tl.constexpr, GROUP: tl.constexpr, HALF2: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """acc + the products of groups first .. last-1 (run-time bounds). Triton's interpreter cannot
    take a tensor bound in range() (numpy 2), so it walks the same steps in a while loop."""
    if INTERPRET:
        group = first
        while group < last:
            weights = _dequantize_group(words_at, scales_ptr, offsets_ptr, parameters_at, group, row_mask,
                                        BLOCK_N, GROUP, HALF2)  # fmt: skip
            acc = tl.dot(weights, tl.load(x_at + group * GROUP, mask=token_mask[None, :], other=0.0), acc)
            group += 1
    else:
        for group in range(first, last):
            weights = _dequantize_group(words_at, scales_ptr, offsets_ptr, parameters_at, group, row_mask,
                                        BLOCK_N, GROUP, HALF2)  # fmt: skip
            acc = tl.dot(weights, tl.load(x_at + group * GROUP, mask=token_mask[None, :], other=0.0), acc)
    return acc


@triton.jit(do_not_specialize=["M"])  # one build serves every token count
def _w4_gemm_kernel(
    x_ptr, words_ptr, scales_ptr, offsets_ptr, out_ptr, M, N,
    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HALF2: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_N rows, BLOCK_M tokens) tile of out^T per program; the token tiles of one
    row tile are neighbours in launch order, so they share its weights through the L2 cache."""
    token_blocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    row_block = pid // token_blocks
    token_block = pid % token_blocks
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = token_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    token_mask = tokens < M
    groups: tl.constexpr = K // GROUP
    word = tl.arange(0, GROUP // 8)
    inputs = tl.arange(0, GROUP)
    words_at = words_ptr + rows[:, None].to(tl.int64) * (K // 8) + word[None, :]
    x_at = x_ptr + tokens[None, :].to(tl.int64) * K + inputs[:, None]  # (GROUP, BLOCK_M): x^T
    parameters_at = rows.to(tl.int64) * groups
    _start_after_previous_kernels(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for group in range(0, groups):  # a static trip count: one compiled loop per K
        weights = _dequantize_group(words_at, scales_ptr, offsets_ptr, parameters_at, group, row_mask,
                                    BLOCK_N, GROUP, HALF2)  # fmt: skip
        acc = tl.dot(weights, tl.load(x_at + group * GROUP, mask=token_mask[None, :], other=0.0), acc)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + tokens[None, :].to(tl.int64) * N + rows[:, None], out, mask=row_mask[:, None] & token_mask[None, :]
    )


@triton.jit(do_not_specialize=["M"])  # one build serves every token count
def _w4_gemm_stream_k_kernel(
    x_ptr, words_ptr, scales_ptr, offsets_ptr, out_ptr, shares_ptr, flags_ptr, M, N,
    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HALF2: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Stream-K: the K steps of all tiles, tile after tile, are cut into one even, contiguous
    range per program (a persistent grid of a few programs per SM), so no SM idles in a last,
    partial wave of tiles (o and down of a 7B at 640 tokens: 96 tiles of 128 x 256 on 132 SMs).
    A tile cut between programs is finished by the program that does its last K steps: it
    waits for the earlier programs' shares (float32, one slot and one flag each: a program
    leaves at most one unfinished tile, the one its range stops inside), adds them in a fixed
    order (the same bits every run) and resets their flags for the next launch. A finisher
    waits only for programs of lower index, which the GPU starts first (and all programs are
    resident at once), and which Triton's interpreter runs first.

    Not in W4_GEMM_TABLE: its first version (segments in forward order) was correct on an
    H200 but 8-40x slower; this order is checked in the interpreter and compiled for sm_87
    and sm_90, not yet timed (bench/check_gpu.py --w4-sweep times it)."""
    token_blocks = tl.cdiv(M, BLOCK_M)
    groups: tl.constexpr = K // GROUP
    total = (tl.cdiv(N, BLOCK_N) * token_blocks).to(tl.int64) * groups
    programs = tl.num_programs(0)
    pid = tl.program_id(0)
    begin = pid * total // programs
    end = (pid + 1) * total // programs
    word = tl.arange(0, GROUP // 8)
    inputs = tl.arange(0, GROUP)
    tile_rows = tl.arange(0, BLOCK_N)
    tile_tokens = tl.arange(0, BLOCK_M)
    _start_after_previous_kernels(PDL)
    # The range's segments from its end backwards: the share of the tile the range stops inside
    # is made first, and the tile it starts inside (whose first steps are the previous program's
    # share) is finished last, when that share is long written. In forward order each finisher
    # waited for the previous program's whole range: a chain over all programs, 8 to 40 times
    # slower than one program per tile (H200, bench/NOTES.md, run 13).
    stop = end
    while stop > begin:
        tile = (stop - 1) // groups
        start = tl.maximum(begin, tile * groups)
        first = (start - tile * groups).to(tl.int32)
        last = (stop - tile * groups).to(tl.int32)
        rows = (tile // token_blocks).to(tl.int32) * BLOCK_N + tile_rows
        tokens = (tile % token_blocks).to(tl.int32) * BLOCK_M + tile_tokens
        row_mask = rows < N
        token_mask = tokens < M
        words_at = words_ptr + rows[:, None].to(tl.int64) * (K // 8) + word[None, :]
        x_at = x_ptr + tokens[None, :].to(tl.int64) * K + inputs[:, None]
        parameters_at = rows.to(tl.int64) * groups
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc = _w4_gemm_groups(acc, x_at, words_at, scales_ptr, offsets_ptr, parameters_at, row_mask, token_mask,
                              first, last, BLOCK_N, GROUP, HALF2, INTERPRET)  # fmt: skip
        if last == groups:  # this program ends the tile: add the shares of the programs before it
            earlier = pid - 1
            more = first > 0
            while more:
                ready = tl.atomic_add(flags_ptr + earlier, 0, sem="acquire")
                while ready == 0:
                    ready = tl.atomic_add(flags_ptr + earlier, 0, sem="acquire")
                share_at = tile_rows[:, None] * BLOCK_M + tile_tokens[None, :]  # (made here: 1 register an element)
                acc += tl.load(shares_ptr + earlier.to(tl.int64) * (BLOCK_N * BLOCK_M) + share_at, cache_modifier=".cg")
                tl.atomic_xchg(flags_ptr + earlier, 0)
                more = earlier * total // programs > tile * groups  # it began inside this tile too
                earlier -= 1
            out = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + tokens[None, :].to(tl.int64) * N + rows[:, None], out,
                     mask=row_mask[:, None] & token_mask[None, :])  # fmt: skip
        else:  # the range stops inside the tile: its share, for the finisher
            share_at = tile_rows[:, None] * BLOCK_M + tile_tokens[None, :]
            tl.store(shares_ptr + pid.to(tl.int64) * (BLOCK_N * BLOCK_M) + share_at, acc)
            tl.debug_barrier()  # every thread's share precedes the release below
            tl.atomic_xchg(flags_ptr + pid, 1, sem="release")
        stop = start


def w4_gemm(
    x: torch.Tensor,
    weight: Int4Weight,
    out: torch.Tensor | None = None,
    *,
    config: W4GemmConfig | None = None,
    half2: bool | None = None,
) -> torch.Tensor:
    """x (M, K) fp16 -> out (M, N) fp16 = x @ dequantize(weight)^T, fp32 accumulation.
    config: (BLOCK_N, BLOCK_M, warps, stages, programs per SM or 0), by default from
    W4_GEMM_TABLE for M; half2: the PTX dequantization (default: on CUDA)."""
    reason = w4_gemm_unsupported(weight)
    if reason:
        raise ValueError(reason)
    tokens, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x has {k} features, the weight {weight.in_features}")
    x = x.contiguous()
    if out is None:
        out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (tokens, n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({tokens}, {n}) tensor")
    if tokens == 0:
        return out
    config = config or w4_gemm_config(tokens)
    if x.device.type == "cuda":
        config = fit_stages(config, weight.group_size, _shared_memory_per_block(x.device.index))
    block_n, block_m, warps, stages, programs_per_sm = config
    half2 = x.device.type == "cuda" if half2 is None else half2
    tiles = triton.cdiv(n, block_n) * triton.cdiv(tokens, block_m)
    arguments = (x, weight.packed.view(torch.int32), weight.scales, weight.offsets, out)
    constants = dict(K=k, GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_M=block_m, HALF2=half2, num_warps=warps,
                     num_stages=stages, **_launch_options(x.device))  # fmt: skip
    programs = min(tiles * (k // weight.group_size), programs_per_sm * _multiprocessors(x.device))
    if programs_per_sm == 0 or tiles % programs == 0 or os.environ.get("NANOVLM_W4_STREAM_K", "1") == "0":
        # one program per tile (also where the tiles fill whole waves of the programs)
        _w4_gemm_kernel[(tiles,)](*arguments, tokens, n, **constants)
    else:
        shares, flags = _stream_k_workspace(x.device, programs, block_n * block_m)
        _w4_gemm_stream_k_kernel[(programs,)](*arguments, shares, flags, tokens, n,
                                              INTERPRET=x.device.type != "cuda", **constants)  # fmt: skip
    return out


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []  # captured CUDA graphs may still point at them


def _stream_k_workspace(device: torch.device, programs: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per device: float32 share slots (one a program) and their flags (zero; each finisher resets
    the flags it consumed). Every product on a device runs on one stream, one after another
    (prefill), so they share one workspace. It only grows, never during a graph capture (the
    warm-up before a capture runs the same shapes), and an outgrown one is kept."""
    shares, flags = _workspaces.get(device, (None, None))
    if shares is None or shares.numel() < programs * tile or flags.numel() < programs:
        size = max(programs * tile, 0 if shares is None else shares.numel())
        count = max(programs, 0 if flags is None else flags.numel())
        if shares is not None:
            _outgrown.append((shares, flags))
        shares = torch.empty(size, dtype=torch.float32, device=device)
        flags = torch.zeros(count, dtype=torch.int32, device=device)
        _workspaces[device] = shares, flags
    return shares, flags
