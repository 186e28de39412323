"""FastLlama: batch-1 inference of a Llama-family decoder on CUDA.

Weights come from a transformers model (the model definition stays transformers'); this class
only re-arranges them for speed:
- the linear layers are 4-bit (W4A16, group 128) or fp16; q/k/v and gate/up are fused,
- the KV cache is static, sized once,
- prefill runs through cuBLAS (4-bit weights are dequantized layer by layer into one scratch
  buffer) and SDPA,
- the decode step is captured once as a CUDA graph: about eight kernels a layer, the position
  and the previous token live on the GPU, so a step costs one graph launch and one read of the
  new token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant.int4 import Int4Weight, quantize_int4
from . import kernels
from .support import unsupported_reason as supports

@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Int4Weight | torch.Tensor  # (Hq + 2 Hkv) * D rows
    o: Int4Weight | torch.Tensor
    post_norm: torch.Tensor
    gate_up: Int4Weight | torch.Tensor  # gate rows, then up rows
    down: Int4Weight | torch.Tensor


class FastLlama:
    def __init__(self, config, *, embed_tokens, final_norm, lm_head, layers: list[LayerWeights],
                 max_tokens: int, device: torch.device):  # fmt: skip
        """Prefer from_hf() or from_state(); tensors must already be on `device`."""
        reason = supports(config)
        if reason:
            raise ValueError(f"FastLlama cannot run this model: {reason}")
        self.config = config
        self.device = device
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.max_tokens = max_tokens
        self.inv_freq, self.attention_scaling = _rotary_parameters(config, device)
        self.embed_tokens, self.final_norm, self.lm_head = embed_tokens, final_norm, lm_head
        self.layers = layers
        self.quantized = isinstance(layers[0].qkv, Int4Weight)
        half = torch.float16
        cache_shape = (len(layers), self.n_kv_heads, max_tokens, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=half, device=device)
        self.v_cache = torch.zeros(cache_shape, dtype=half, device=device)
        # Prefill dequantizes each 4-bit matrix into this one buffer before its GEMM.
        # gate and up are dequantized one after the other, so the buffer holds half of gate_up
        first = layers[0]
        largest = max(first.qkv.out_features * self.hidden, self.intermediate * self.hidden) if self.quantized else 0
        self._scratch = torch.empty(largest, dtype=half, device=device) if self.quantized else None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._gemv_configs: dict[tuple, tuple[int, int, int]] = {}

    @classmethod
    def from_hf(cls, text_model, lm_head: torch.nn.Linear, *, max_tokens: int, quantize: bool,
                device: torch.device, progress=None) -> "FastLlama":  # fmt: skip
        """Convert a transformers LlamaModel (on any device) layer by layer: each weight goes to
        the GPU in fp16 and is quantized there, so GPU memory never holds the fp16 model."""
        reason = supports(text_model.config)
        if reason:
            raise ValueError(f"FastLlama cannot run this model: {reason}")
        half = torch.float16

        def tensor(parameter):
            return parameter.detach().to(device, half)

        def linear(*modules):
            weight = torch.cat([tensor(m.weight) for m in modules], dim=0)
            return quantize_int4(weight) if quantize else weight

        layers = []
        for layer in _progress(text_model.layers, progress):
            attention, mlp = layer.self_attn, layer.mlp
            layers.append(
                LayerWeights(
                    input_norm=tensor(layer.input_layernorm.weight),
                    qkv=linear(attention.q_proj, attention.k_proj, attention.v_proj),
                    o=linear(attention.o_proj),
                    post_norm=tensor(layer.post_attention_layernorm.weight),
                    gate_up=linear(mlp.gate_proj, mlp.up_proj),
                    down=linear(mlp.down_proj),
                )
            )
        return cls(
            text_model.config,
            embed_tokens=tensor(text_model.embed_tokens.weight),
            final_norm=tensor(text_model.norm.weight),
            lm_head=tensor(lm_head.weight),
            layers=layers,
            max_tokens=max_tokens,
            device=device,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"embed_tokens": self.embed_tokens, "final_norm": self.final_norm, "lm_head": self.lm_head}
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}"
            state[f"{prefix}.input_norm"] = layer.input_norm
            state[f"{prefix}.post_norm"] = layer.post_norm
            for name in ("qkv", "o", "gate_up", "down"):
                weight = getattr(layer, name)
                if isinstance(weight, Int4Weight):
                    state.update(weight.state(f"{prefix}.{name}"))
                else:
                    state[f"{prefix}.{name}"] = weight
        return state

    @classmethod
    def from_state(cls, config, state: dict[str, torch.Tensor], *, max_tokens: int, device: torch.device) -> "FastLlama":
        state = {name: tensor.to(device) for name, tensor in state.items()}

        def weight(prefix):
            return Int4Weight.from_state(state, prefix) if f"{prefix}.packed" in state else state[prefix]

        layers = [
            LayerWeights(
                input_norm=state[f"layers.{i}.input_norm"],
                qkv=weight(f"layers.{i}.qkv"),
                o=weight(f"layers.{i}.o"),
                post_norm=state[f"layers.{i}.post_norm"],
                gate_up=weight(f"layers.{i}.gate_up"),
                down=weight(f"layers.{i}.down"),
            )
            for i in range(config.num_hidden_layers)
        ]
        return cls(
            config,
            embed_tokens=state["embed_tokens"],
            final_norm=state["final_norm"],
            lm_head=state["lm_head"],
            layers=layers,
            max_tokens=max_tokens,
            device=device,
        )

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every linear layer, the norms and the LM head."""
        total = (self.lm_head.numel() + self.final_norm.numel()) * 2
        for layer in self.layers:
            for weight in (layer.qkv, layer.o, layer.gate_up, layer.down):
                total += weight.nbytes() if isinstance(weight, Int4Weight) else weight.numel() * 2
            total += (layer.input_norm.numel() + layer.post_norm.numel()) * 2
        return total

    # ---- prefill --------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens)

    def _linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        if isinstance(weight, Int4Weight):
            n, k = weight.out_features, weight.in_features
            weight = kernels.w4_dequantize(weight, self._scratch[: n * k].view(n, k))
        return F.linear(x, weight)

    def _gate_and_up(self, h: torch.Tensor, gate_up) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(gate_up, Int4Weight):
            half = gate_up.out_features // 2
            return self._linear(h, gate_up.rows(0, half)), self._linear(h, gate_up.rows(half, 2 * half))
        return self._linear(h, gate_up).chunk(2, dim=-1)

    def prefill(self, embeds: torch.Tensor, start: int) -> int:
        """Run positions start..start+L-1 (embeds (L, H)), fill their KV; the next token (greedy)."""
        return int(torch.argmax(self.prefill_logits(embeds, start)))

    @torch.inference_mode()
    def prefill_logits(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Logits after the last of positions start..start+L-1 (their KV is written)."""
        length = embeds.shape[0]
        if start + length > self.max_tokens:
            raise ValueError(f"{start + length} tokens exceed the KV cache of {self.max_tokens}")
        positions = torch.arange(start, start + length, device=self.device, dtype=torch.int32)
        x = embeds.to(torch.float16)
        q = torch.empty(length, self.n_heads, self.head_dim, dtype=torch.float16, device=self.device)
        end = start + length
        mask = None
        if start > 0:  # queries sit at the end of the keys: causal, aligned bottom-right
            mask = torch.ones(length, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        for index, layer in enumerate(self.layers):
            h = kernels.rmsnorm(x, layer.input_norm, self.eps)
            qkv = self._linear(h, layer.qkv)
            kernels.rope_and_cache(
                qkv, positions, self.inv_freq, self.attention_scaling,
                self.k_cache[index], self.v_cache[index], q, self.n_heads, self.n_kv_heads,
            )  # fmt: skip
            attention = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                self.k_cache[index, :, :end][None],
                self.v_cache[index, :, :end][None],
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
            x = x + self._linear(attention[0].transpose(0, 1).reshape(length, -1), layer.o)
            h = kernels.rmsnorm(x, layer.post_norm, self.eps)
            gate, up = self._gate_and_up(h, layer.gate_up)
            x = x + self._linear(F.silu(gate) * up, layer.down)
        last = kernels.rmsnorm(x[-1].contiguous(), self.final_norm, self.eps)
        return F.linear(last, self.lm_head)

    # ---- decode ---------------------------------------------------------------------------

    def _gemv(self, x, weight, out=None, residual=None, gated=False):
        if not isinstance(weight, Int4Weight):
            y = F.linear(x, weight)
            if gated:
                gate, up = y.chunk(2)
                y = F.silu(gate) * up
            if residual is not None:
                y = y + residual
            if out is not None:
                out.copy_(y)
                return out
            return y
        config = self._gemv_configs.get((weight.out_features, weight.in_features, gated), kernels.DEFAULT_GEMV_CONFIG)
        return kernels.w4_gemv(x, weight, out, residual=residual, gated=gated, config=config)

    def _decode_step_body(self) -> None:
        """The graph body: reads self._token and self._position, writes self._token (greedy)."""
        x = self._x
        x.copy_(F.embedding(self._token, self.embed_tokens)[0])
        for index, layer in enumerate(self.layers):
            h = kernels.rmsnorm(x, layer.input_norm, self.eps, out=self._h)
            qkv = self._gemv(h, layer.qkv, out=self._qkv)
            kernels.rope_and_cache(
                qkv[None], self._position, self.inv_freq, self.attention_scaling,
                self.k_cache[index], self.v_cache[index], self._q, self.n_heads, self.n_kv_heads,
            )  # fmt: skip
            kernels.decode_attention(
                self._q[0], self.k_cache[index], self.v_cache[index], self._length, self._attention, self._attention_workspace
            )
            self._gemv(self._attention.view(-1), layer.o, out=x, residual=x)
            h = kernels.rmsnorm(x, layer.post_norm, self.eps, out=self._h)
            act = self._gemv(h, layer.gate_up, out=self._act, gated=True)
            self._gemv(act, layer.down, out=x, residual=x)
        last = kernels.rmsnorm(x, self.final_norm, self.eps, out=self._h)
        torch.matmul(self.lm_head, last, out=self._logits)
        self._token.copy_(torch.argmax(self._logits).view(1))
        self._position.add_(1)
        self._length.add_(1)

    def _allocate_decode_buffers(self) -> None:
        device, half = self.device, torch.float16
        self._token = torch.zeros(1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.int32, device=device)
        self._length = torch.ones(1, dtype=torch.int32, device=device)
        self._x = torch.zeros(self.hidden, dtype=half, device=device)
        self._h = torch.zeros(self.hidden, dtype=half, device=device)
        self._qkv = torch.zeros((self.n_heads + 2 * self.n_kv_heads) * self.head_dim, dtype=half, device=device)
        self._q = torch.zeros(1, self.n_heads, self.head_dim, dtype=half, device=device)
        self._attention = torch.zeros(self.n_heads, self.head_dim, dtype=half, device=device)
        self._act = torch.zeros(self.intermediate, dtype=half, device=device)
        self._logits = torch.zeros(self.lm_head.shape[0], dtype=half, device=device)
        self._attention_workspace = kernels.attention_workspace(self.n_heads, self.head_dim, self.max_tokens, device)
        self._host_token = -1  # what self._token holds, as far as the host knows
        self._host_position = -1

    def tune_gemv(self) -> dict:
        """Pick the fastest GEMV launch configuration for each 4-bit matrix shape, timing CUDA
        graphs of back-to-back calls (how the decode step runs them)."""
        if not self.quantized:
            return {}
        layer = self.layers[0]
        x = torch.randn(max(self.hidden, self.intermediate), dtype=torch.float16, device=self.device)
        for weight, gated in ((layer.qkv, False), (layer.o, False), (layer.gate_up, True), (layer.down, False)):
            timings = {}
            for config in kernels.QUICK_GEMV_CONFIGS:
                def run(config=config):
                    kernels.w4_gemv(x[: weight.in_features], weight, gated=gated, config=config)

                timings[config] = graph_time_us(run, calls=20, replays=5)
            self._gemv_configs[(weight.out_features, weight.in_features, gated)] = min(timings, key=timings.get)
        return dict(self._gemv_configs)

    def capture(self) -> float:
        """Tune, warm up and capture the decode step; returns the seconds it took."""
        started = time.perf_counter()
        self._allocate_decode_buffers()
        self.tune_gemv()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # compile every Triton kernel outside the capture
                self._position.zero_()
                self._length.fill_(1)
                self._decode_step_body()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), torch.inference_mode():
            self._decode_step_body()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def decode_step(self, token: int, position: int) -> int:
        """Feed `token` at `position`; the next token (greedy)."""
        if self._graph is None:
            # Capturing warms up at position 0, which would overwrite a prompt's KV: do it first.
            raise RuntimeError("call capture() once after loading, before the first prefill")
        # The graph leaves its own output token and the next position on the GPU: only write
        # them when the caller asks for something else (the first step after a prefill).
        if token != self._host_token:
            self._token.fill_(token)
        if position != self._host_position:
            self._position.fill_(position)
            self._length.fill_(position + 1)
        self._graph.replay()
        next_token = int(self._token.item())
        self._host_token, self._host_position = next_token, position + 1
        return next_token

    def rewind(self, length: int) -> None:
        """Nothing to do: positions are explicit, and attention never reads past `length`."""


def graph_time_us(function, calls: int = 50, replays: int = 20) -> float:
    """Median microseconds of one call of `function`, from CUDA-graph replays of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def _rotary_parameters(config, device) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as transformers computes them (RoPE scaling too)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    return rotary.inv_freq.float().to(device), float(rotary.attention_scaling)


def _progress(iterable, progress):
    return progress(iterable) if progress else iterable
