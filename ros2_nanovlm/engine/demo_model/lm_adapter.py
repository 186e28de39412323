"""Low-rank adapter (LoRA) of the demo VLM's language model: trained with the projector by
training/train_projector.py, merged into SmolLM2's weights when the demo model is assembled
(build.py), so the composed model stays a plain transformers LM directory.

    add_lora(lm, rank=8, alpha=16)       # training: wraps the target Linear layers
    save_adapter(lm, directory)          # lm_adapter.safetensors: per layer A (r,in) and B (out,r)
    merge_adapter(lm, directory)         # W += B @ A, in place (B stored already scaled)

No ROS imports; depends only on torch and safetensors.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ADAPTER_FILE = "lm_adapter.safetensors"
# Attention projections of every Llama layer: the adapter steers what the answer reads from the
# image tokens (yes/no: does the question's word match the category or name slots?).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(x)); B starts at zero, so the wrapped layer starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        with torch.no_grad():
            bound = (1.0 / base.in_features) ** 0.5  # kaiming-uniform (a=sqrt(5)) bound, as nn.Linear
            self.lora_A.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Wrap every TARGETS Linear of `model` in place; returns the new trainable parameters."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _name, module in list(model.named_modules()):
        for target in TARGETS:
            child = getattr(module, target, None)
            if isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha, generator)
                setattr(module, target, wrapped)
                params += [wrapped.lora_A, wrapped.lora_B]
    if not params:
        raise ValueError("no target layers found for the adapter")
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer path>.lora_A": (r,in), "<layer path>.lora_B": (out,r) times the scale}."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.lora_A"] = module.lora_A.detach().clone()
            state[f"{name}.lora_B"] = (module.lora_B.detach() * module.scale).clone()
    return state


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write lm_adapter.safetensors (fp16)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in adapter_state(model).items()}
    save_file(state, os.path.join(directory, ADAPTER_FILE), metadata={"format": "pt", "merge": "W += B @ A"})


def unwrap_lora(model: nn.Module) -> None:
    """Put the plain Linear layers back (after training; their weights were never changed)."""
    for _name, module in list(model.named_modules()):
        for target in TARGETS:
            child = getattr(module, target, None)
            if isinstance(child, LoRALinear):
                setattr(module, target, child.base)


@torch.no_grad()
def merge_adapter(model: nn.Module, directory: str) -> int:
    """W += B @ A for every layer in directory/lm_adapter.safetensors; returns how many layers.
    Strict: every stored layer must exist in `model` with matching shapes."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(directory, ADAPTER_FILE))
    modules = dict(model.named_modules())
    layers = sorted({key.rsplit(".", 1)[0] for key in state})
    for layer in layers:
        linear = modules.get(layer)
        a, b = state.get(f"{layer}.lora_A"), state.get(f"{layer}.lora_B")
        if not isinstance(linear, nn.Linear) or a is None or b is None:
            raise ValueError(f"{ADAPTER_FILE}: '{layer}' is not a Linear layer of the model with both factors")
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape) or a.shape[0] != b.shape[1]:
            raise ValueError(f"{ADAPTER_FILE}: '{layer}' factors {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                             f"weight {tuple(linear.weight.shape)}")  # fmt: skip
        delta = b.float() @ a.float()
        linear.weight += delta.to(linear.weight.dtype)
    return len(layers)
