"""Group-wise asymmetric 4-bit weights (W4A16): the format, the quantizer and a reference
dequantizer that the CUDA kernels are checked against.

Layout of a weight W (out_features N, in_features K), groups of G consecutive inputs:
    packed  uint8  (N, K/2)   byte j of row n = W[n, 2j] in the low nibble, W[n, 2j+1] in the high
    scales  fp16   (N, K/G)   W[n, k] ~= q[n, k] * scales[n, k // G] + offsets[n, k // G]
    offsets fp16   (N, K/G)   (the group minimum), q in 0..15
About 4.25 bits per weight at G = 128.
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

    def rows(self, start: int, stop: int) -> "Int4Weight":
        """Output rows start..stop-1 (views, no copy)."""
        return Int4Weight(self.packed[start:stop], self.scales[start:stop], self.offsets[start:stop], self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.offsets))

    def to(self, device) -> "Int4Weight":
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.offsets.to(device), self.group_size)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.packed": self.packed, f"{prefix}.scales": self.scales, f"{prefix}.offsets": self.offsets}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> "Int4Weight":
        packed = state[f"{prefix}.packed"]
        scales = state[f"{prefix}.scales"]
        return cls(packed, scales, state[f"{prefix}.offsets"], packed.shape[1] * 2 // scales.shape[1])


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> Int4Weight:
    """Round-to-nearest over each group's [min, max] range (computed in float32)."""
    out_features, in_features = weight.shape
    group_size = group_size or group_size_for(in_features)
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    # Round the scale and offset to fp16 first, then pick q against the rounded values, so the
    # stored q is the best one for the parameters the kernels will actually use.
    scales = ((high - low) / 15.0).clamp(min=1e-8).half()
    offsets = low.half()
    q = torch.round((groups - offsets.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15)
    q = q.to(torch.uint8).reshape(out_features, in_features)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return Int4Weight(packed.contiguous(), scales.contiguous(), offsets.contiguous(), group_size)


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight the packed one stands for (the reference for the kernels)."""
    packed = weight.packed
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).float()
    groups = q.reshape(q.shape[0], -1, weight.group_size)
    values = groups * weight.scales.float()[..., None] + weight.offsets.float()[..., None]
    return values.reshape(q.shape).to(dtype)
