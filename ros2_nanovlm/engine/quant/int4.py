"""Group-wise asymmetric 4-bit weights (W4A16): the format, the quantizer and a reference
dequantizer that the CUDA kernels are checked against.

Layout of a weight W (out_features N, in_features K), groups of G consecutive inputs:
    packed  uint8  (N, K/2)   read as int32 words: G/8 words per group; nibble i (bits
                              4i..4i+3) of word w of group g holds q[n, g*G + 2*(w + (G/8)*(i%4)) + i//4]
    scales  fp16   (N, K/G)   W[n, k] ~= q[n, k] * scales[n, k // G] + offsets[n, k // G]
    offsets fp16   (N, K/G)   (the group minimum), q in 0..15
About 4.25 bits per weight at G = 128. The nibble order serves the GEMV's half2 arithmetic:
nibbles k and k+4 of a word (one shift apart from the two halves of a half2) multiply two
adjacent inputs, and the pairs (k, k+4) of a run of words meet a contiguous run of input pairs
x[g*G + 2*(G/8)*k : g*G + 2*(G/8)*(k+1)], which the kernel loads as int32 words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFERRED_GROUP_SIZE = 128


def group_size_for(in_features: int, preferred: int = PREFERRED_GROUP_SIZE) -> int:
    """The largest of preferred, preferred/2, ... (at least 32) that divides in_features."""
    size = preferred
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    raise ValueError(f"in_features={in_features} is not a multiple of 32: cannot group-quantize it")


@dataclass
class Int4Weight:
    packed: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    def rows(self, start: int, stop: int) -> Int4Weight:
        """Output rows start..stop-1 (views, no copy)."""
        return Int4Weight(self.packed[start:stop], self.scales[start:stop], self.offsets[start:stop], self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.offsets))

    def to(self, device) -> Int4Weight:
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.offsets.to(device), self.group_size)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.packed": self.packed, f"{prefix}.scales": self.scales, f"{prefix}.offsets": self.offsets}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> Int4Weight:
        packed = state[f"{prefix}.packed"]
        scales = state[f"{prefix}.scales"]
        return cls(packed, scales, state[f"{prefix}.offsets"], packed.shape[1] * 2 // scales.shape[1])


# Range shrink factors tried per group: clipping a few outliers often lowers the error of the rest.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int | None = None, clip_ratios=CLIP_RATIOS) -> Int4Weight:
    """Round-to-nearest per group; each group's [min, max] range is shrunk by the ratio in
    `clip_ratios` that gives the smallest squared error (computed in float32)."""
    out_features, in_features = weight.shape
    group_size = group_size or group_size_for(in_features)
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    best = None
    for ratio in clip_ratios:
        scales, offsets, q = _round_to_grid(groups, low * ratio, high * ratio)
        error = ((q * scales.float()[..., None] + offsets.float()[..., None] - groups) ** 2).sum(-1)
        if best is None:
            best = (error, scales, offsets, q)
            continue
        better = error < best[0]
        best = (
            torch.where(better, error, best[0]),
            torch.where(better, scales, best[1]),
            torch.where(better, offsets, best[2]),
            torch.where(better[..., None], q, best[3]),
        )
    _, scales, offsets, q = best
    return Int4Weight(_pack(q.to(torch.int64), group_size), scales.contiguous(), offsets.contiguous(), group_size)


def _round_to_grid(groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor):
    """fp16 scale and offset for [low, high], and q (float, 0..15) against the fp16-rounded
    values, so q is the best one for the parameters the kernels actually use."""
    scales = ((high - low) / 15.0).clamp(min=1e-8).half()
    offsets = low.half()
    q = torch.round((groups - offsets.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15)
    return scales, offsets, q


def _pack(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K/G, G) values 0..15 -> (N, K/2) uint8 in the layout above."""
    out_features = q.shape[0]
    words_per_group = group_size // 8
    # column 2*(w + W*k) + half of a group is nibble k + 4*half of word w
    pairs = q.reshape(out_features, -1, 4, words_per_group, 2)  # (n, g, k, w, half)
    nibbles = pairs.permute(0, 1, 4, 2, 3).reshape(out_features, -1, 8, words_per_group)  # (n, g, i, w)
    shifts = (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)
    words = (nibbles << shifts).sum(dim=2)  # (n, g, w), up to 2**32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(out_features, -1).contiguous().view(torch.uint8)


def _unpack(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) values 0..15 (int64)."""
    out_features = packed.shape[0]
    words_per_group = group_size // 8
    words = packed.contiguous().view(torch.int32).to(torch.int64).reshape(out_features, -1, 1, words_per_group)
    shifts = (4 * torch.arange(8, device=packed.device)).view(1, 1, 8, 1)
    nibbles = ((words >> shifts) & 0xF).reshape(out_features, -1, 2, 4, words_per_group)  # (n, g, half, k, w)
    return nibbles.permute(0, 1, 3, 4, 2).reshape(out_features, -1)


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight the packed one stands for (the reference for the kernels)."""
    q = _unpack(weight.packed, weight.group_size).float()
    groups = q.reshape(q.shape[0], -1, weight.group_size)
    values = groups * weight.scales.float()[..., None] + weight.offsets.float()[..., None]
    return values.reshape(q.shape).to(dtype)
