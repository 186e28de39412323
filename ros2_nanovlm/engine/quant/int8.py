"""Row-wise symmetric int8 for the two vocabulary-sized matrices of a 4-bit model: the token
embeddings and the LM head (W[n, :] ~= values[n, :] * scales[n]).

Of a 7B model's 4-bit footprint they are 0.5 GB in fp16 (32k x 4096 each), more than the KV
cache of 1024 tokens; int8 halves that. One scale per row of 4096 keeps the error (at most half
a step of max|row|/127) far below what the 4-bit linear layers already add, and unlike 4 bits it
leaves the logits' ranking alone (bench/quant_quality.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int8Rows:
    values: torch.Tensor  # int8 (N, K)
    scales: torch.Tensor  # fp16 (N,)

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def in_features(self) -> int:
        return self.values.shape[1]

    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * self.scales.element_size()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` in fp16: an embedding lookup."""
        return (self.values[ids].float() * self.scales[ids].float()[..., None]).half()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.values": self.values, f"{prefix}.scales": self.scales}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> Int8Rows:
        return cls(state[f"{prefix}.values"], state[f"{prefix}.scales"])


@torch.no_grad()
def quantize_int8_rows(weight: torch.Tensor) -> Int8Rows:
    scales = (weight.float().abs().amax(dim=1) / 127.0).clamp(min=1e-8).half()
    values = torch.round(weight.float() / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Rows(values.contiguous(), scales)


def dequantize_int8_rows(weight: Int8Rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (weight.values.float() * weight.scales.float()[:, None]).to(dtype)
