"""FastLlama: batch-1 inference of a Llama-family decoder on CUDA.

Llama-family: Llama (LLaVA, VILA, SmolLM2 of SmolVLM), Qwen2 and Qwen2.5 (qkv bias; Qwen2.5-VL's
multimodal rotary positions), Qwen3 (q and k RMSNorms per head) and StableLM (Obsidian:
LayerNorm with bias, rotary on a quarter of each head of 80 dimensions); cuda/support.py says
which configurations. What varies is read from the transformers modules themselves (a bias is
there or not, the norm's kind, the rotary table of the model's own rotary module), so a variant
costs a few optional tensors, not a class.

Weights come from a transformers model (the model definition stays transformers'); this class
only re-arranges them for speed:
- the linear layers are 4-bit (W4A16, group 128) or fp16; q/k/v and gate/up are fused; with
  4-bit layers the token embeddings and the LM head are row-wise int8 (quant/int8.py),
- the KV cache is static, sized once,
- prefill runs through SDPA and, for the linear layers, cuBLAS (fp16) or, for 4-bit weights,
  the 4-bit GEMM of w4_gemm.py (tensor cores, weights dequantized in registers) up to
  w4_gemm.W4_GEMM_MAX_TOKENS tokens, and above (where it measured slower) or with
  NANOVLM_W4_GEMM=0 / set_w4_gemm(False) the old path, kept as the fallback: each matrix
  dequantized into one scratch buffer, then cuBLAS. A prefill that repeats (a new frame, the
  same question) replays a CUDA graph (prefill_graphs.py),
- the decode step is captured once as a CUDA graph of seven kernels a layer (RMSNorm, qkv,
  attention with RoPE and the KV write, o, RMSNorm, gate/up with SiLU, down); the o and down
  products reach the residual through the next RMSNorm, in a fixed order, so a step gives the
  same bits every run. The position and the previous token live on the GPU, so a step costs
  one graph launch and one read of the new token.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant.int4 import Int4Weight, quantize_int4
from ..quant.int8 import Int8Rows, quantize_int8_rows
from ..token_mask import DeviceTokenMask
from . import kernels
from . import w4_gemm as w4
from .prefill_graphs import PrefillGraphs
from .support import unsupported_reason as supports
from .w4_gemm import w4_gemm, w4_gemm_unsupported

_log = logging.getLogger(__name__)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Int4Weight | torch.Tensor  # (Hq + 2 Hkv) * D rows
    o: Int4Weight | torch.Tensor
    post_norm: torch.Tensor
    gate_up: Int4Weight | torch.Tensor  # gate rows, then up rows
    down: Int4Weight | torch.Tensor
    # Present in some families only (None elsewhere):
    input_norm_bias: torch.Tensor | None = None  # LayerNorm instead of RMSNorm (StableLM)
    post_norm_bias: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None  # (Hq + 2 Hkv) * D (Qwen2, Qwen2.5)
    q_norm: torch.Tensor | None = None  # (D,) RMSNorm of each head of q, and of k, before the rotation (Qwen3)
    k_norm: torch.Tensor | None = None


# The optional tensors of LayerWeights, as they are named in state_dict()
OPTIONAL_LAYER_TENSORS = ("input_norm_bias", "post_norm_bias", "qkv_bias", "q_norm", "k_norm")


@dataclass
class Rotary:
    """The rotary embedding as the model's own rotary module computes it: `inv_freq` (R/2,)
    float32 for the first R dimensions of a head (R < D: partial rotary), `attention_scaling`,
    and `sections` (R/2,) int32: which row of a prompt's position ids each frequency reads
    (all 0 for plain RoPE; Qwen's multimodal RoPE reads time, height and width rows)."""

    inv_freq: torch.Tensor
    attention_scaling: float
    sections: torch.Tensor

    @classmethod
    def of_module(cls, rotary_emb, device) -> Rotary:
        inv_freq = rotary_emb.inv_freq.float().to(device)
        return cls(inv_freq, float(rotary_emb.attention_scaling), _frequency_sections(rotary_emb).to(device))

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor], config, device) -> Rotary:
        if "rotary.inv_freq" not in state:  # a 4-bit cache file of a Llama written before these keys
            inv_freq, scaling = _llama_rotary_parameters(config, device)
            return cls(inv_freq, scaling, torch.zeros_like(inv_freq, dtype=torch.int32))
        return cls(
            state["rotary.inv_freq"].float().to(device),
            float(state["rotary.attention_scaling"]),
            state["rotary.sections"].to(device, torch.int32),
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "rotary.inv_freq": self.inv_freq,
            "rotary.attention_scaling": torch.tensor(self.attention_scaling),
            "rotary.sections": self.sections,
        }

    @property
    def sections_used(self) -> int:
        return int(self.sections.max()) + 1 if self.sections.numel() else 1


class FastLlama:
    def __init__(self, config, *, embed_tokens, final_norm, lm_head, layers: list[LayerWeights],
                 max_tokens: int, device: torch.device, rotary: Rotary | None = None,
                 final_norm_bias: torch.Tensor | None = None):  # fmt: skip
        """Prefer from_hf() or from_state(); tensors must already be on `device`. Without
        `rotary`, Llama's rotary embedding of `config`."""
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
        eps = getattr(config, "rms_norm_eps", None)
        self.eps = eps if eps is not None else config.layer_norm_eps
        self.max_tokens = max_tokens
        if rotary is None:
            inv_freq, scaling = _llama_rotary_parameters(config, device)
            rotary = Rotary(inv_freq, scaling, torch.zeros_like(inv_freq, dtype=torch.int32))
        self.rotary = rotary
        self.inv_freq, self.attention_scaling = rotary.inv_freq, rotary.attention_scaling
        # The rotary position of every cache slot, one row per section: prefill_logits writes
        # a prompt's rows (Qwen's 3-D positions, or the slots' own), prefill reads them (graphs
        # too: the buffer's address is fixed). The decode step rotates by slot + _rope_offset.
        self._rope_positions = torch.arange(max_tokens, dtype=torch.int32, device=device).repeat(
            rotary.sections_used, 1
        )
        self._rope_offset = torch.zeros(1, dtype=torch.int32, device=device)
        self.embed_tokens, self.final_norm, self.lm_head = embed_tokens, final_norm, lm_head
        self.final_norm_bias = final_norm_bias
        self.layers = layers
        self.quantized = isinstance(layers[0].qkv, Int4Weight)
        half = torch.float16
        cache_shape = (len(layers), self.n_kv_heads, max_tokens, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=half, device=device)
        self.v_cache = torch.zeros(cache_shape, dtype=half, device=device)
        # Prefill multiplies 4-bit matrices with w4_gemm; "" or why not (then each matrix is
        # dequantized into a scratch buffer, made on first use, and multiplied by cuBLAS).
        self.w4_gemm_disabled = "NANOVLM_W4_GEMM=0" if os.environ.get("NANOVLM_W4_GEMM", "1") == "0" else ""
        self._scratch: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._prefill_graphs: PrefillGraphs | None = None  # made by capture(): CUDA only
        self._warmup_stream: torch.cuda.Stream | None = None
        self.vocab_size = lm_head.out_features if isinstance(lm_head, Int8Rows) else lm_head.shape[0]
        # Read by every token choice, prefill and the captured decode step alike.
        self.token_mask = DeviceTokenMask(self.vocab_size, device)
        self._gemv_configs: dict[tuple, tuple[int, ...]] = {}  # (rows, columns, gated) -> kernels.GEMV_CONFIGS entry
        self._partial_configs: dict[str, tuple[int, ...]] = {}  # "o", "down" -> kernels.GEMV_CONFIGS entry
        self._started_ahead: tuple[int, int] | None = None  # (token, position) of a step already launched

    @classmethod
    def from_hf(cls, text_model, lm_head: torch.nn.Linear, *, max_tokens: int, quantize: bool,
                device: torch.device, progress=None) -> FastLlama:  # fmt: skip
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

        def vocabulary(parameter):
            return quantize_int8_rows(tensor(parameter)) if quantize else tensor(parameter)

        def bias(module):  # a LayerNorm's or a Linear's bias; None where there is none
            parameter = getattr(module, "bias", None)
            return None if parameter is None else tensor(parameter)

        def biases(*modules):
            found = [bias(module) for module in modules]
            return None if all(each is None for each in found) else torch.cat(found)

        def norm_weight(module):
            return None if module is None else tensor(module.weight)

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
                    input_norm_bias=bias(layer.input_layernorm),
                    post_norm_bias=bias(layer.post_attention_layernorm),
                    qkv_bias=biases(attention.q_proj, attention.k_proj, attention.v_proj),
                    q_norm=norm_weight(getattr(attention, "q_norm", None)),
                    k_norm=norm_weight(getattr(attention, "k_norm", None)),
                )
            )
        return cls(
            text_model.config,
            embed_tokens=vocabulary(text_model.embed_tokens.weight),
            final_norm=tensor(text_model.norm.weight),
            final_norm_bias=bias(text_model.norm),
            lm_head=vocabulary(lm_head.weight),
            layers=layers,
            max_tokens=max_tokens,
            device=device,
            rotary=Rotary.of_module(text_model.rotary_emb, device),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"final_norm": self.final_norm, **self.rotary.state()}
        if self.final_norm_bias is not None:
            state["final_norm_bias"] = self.final_norm_bias
        for name in ("embed_tokens", "lm_head"):
            weight = getattr(self, name)
            if isinstance(weight, Int8Rows):
                state.update(weight.state(name))
            else:
                state[name] = weight
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}"
            state[f"{prefix}.input_norm"] = layer.input_norm
            state[f"{prefix}.post_norm"] = layer.post_norm
            for name in OPTIONAL_LAYER_TENSORS:
                if getattr(layer, name) is not None:
                    state[f"{prefix}.{name}"] = getattr(layer, name)
            for name in ("qkv", "o", "gate_up", "down"):
                weight = getattr(layer, name)
                if isinstance(weight, Int4Weight):
                    state.update(weight.state(f"{prefix}.{name}"))
                else:
                    state[f"{prefix}.{name}"] = weight
        return state

    @classmethod
    def from_state(cls, config, state: dict[str, torch.Tensor], *, max_tokens: int, device: torch.device) -> FastLlama:
        state = {name: tensor.to(device) for name, tensor in state.items()}

        def weight(prefix):
            return Int4Weight.from_state(state, prefix) if f"{prefix}.packed" in state else state[prefix]

        def vocabulary(name):
            return Int8Rows.from_state(state, name) if f"{name}.values" in state else state[name]

        layers = [
            LayerWeights(
                input_norm=state[f"layers.{i}.input_norm"],
                qkv=weight(f"layers.{i}.qkv"),
                o=weight(f"layers.{i}.o"),
                post_norm=state[f"layers.{i}.post_norm"],
                gate_up=weight(f"layers.{i}.gate_up"),
                down=weight(f"layers.{i}.down"),
                **{name: state.get(f"layers.{i}.{name}") for name in OPTIONAL_LAYER_TENSORS},
            )
            for i in range(config.num_hidden_layers)
        ]
        return cls(
            config,
            embed_tokens=vocabulary("embed_tokens"),
            final_norm=state["final_norm"],
            final_norm_bias=state.get("final_norm_bias"),
            lm_head=vocabulary("lm_head"),
            layers=layers,
            max_tokens=max_tokens,
            device=device,
            rotary=Rotary.of_state(state, config, device),
        )

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every linear layer, the norms and the LM head."""
        head = self.lm_head
        total = (head.nbytes() if isinstance(head, Int8Rows) else head.numel() * 2) + self.final_norm.numel() * 2
        for layer in self.layers:
            for weight in (layer.qkv, layer.o, layer.gate_up, layer.down):
                total += weight.nbytes() if isinstance(weight, Int4Weight) else weight.numel() * 2
            total += (layer.input_norm.numel() + layer.post_norm.numel()) * 2
            total += sum(
                getattr(layer, name).numel() * 2 for name in OPTIONAL_LAYER_TENSORS if getattr(layer, name) is not None
            )
        return total

    # ---- prefill --------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens
        return table.rows(ids) if isinstance(table, Int8Rows) else F.embedding(ids, table)

    def _logits_of(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """LM head: h (H,) -> (vocab,)."""
        if isinstance(self.lm_head, Int8Rows):
            return kernels.i8_gemv(h, self.lm_head, out)
        if out is None:
            return torch.mv(self.lm_head, h)
        return torch.matmul(self.lm_head, h, out=out)

    def set_w4_gemm(self, enabled: bool) -> None:
        """Prefill 4-bit matrices with w4_gemm (True) or dequantize + cuBLAS (False, the
        fallback; for comparison). Captured prefill graphs hold the old choice: they are dropped."""
        self.w4_gemm_disabled = "" if enabled else "set_w4_gemm(False)"
        if self._prefill_graphs is not None:
            self._prefill_graphs = PrefillGraphs(self._prefill_body, self.hidden, self.max_tokens, self.device,
                                                 self._warmup_stream)  # fmt: skip

    def _linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        if not isinstance(weight, Int4Weight):
            return F.linear(x, weight)
        if self._uses_w4_gemm(x.shape[0], weight):
            try:
                return w4_gemm(x, weight)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # a kernel that fails to build (or launch): the old path
                if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise  # (the warm-up before a capture runs the same shapes: not reached)
                self.w4_gemm_disabled = f"w4_gemm failed: {error!r}"[:500]
                _log.warning("%s; 4-bit prefill falls back to dequantize + cuBLAS", self.w4_gemm_disabled)
        return self._dequantize_and_multiply(x, weight)

    def _uses_w4_gemm(self, tokens: int, weight: Int4Weight) -> bool:
        return not self.w4_gemm_disabled and tokens <= w4.W4_GEMM_MAX_TOKENS and not w4_gemm_unsupported(weight)

    def _dequantize_and_multiply(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        """The fallback: the matrix dequantized into the scratch buffer, in row chunks when it is
        larger, then cuBLAS. hidden x max(hidden, intermediate/2) holds o whole and qkv, gate,
        up and down in two or three chunks (45 MB for a 7B model, not 100)."""
        if self._scratch is None:
            size = self.hidden * max(self.hidden, self.intermediate // 2)
            self._scratch = torch.empty(size, dtype=torch.float16, device=self.device)
        n, k = weight.out_features, weight.in_features
        chunks = -(-n * k // self._scratch.numel())
        while -(-n // chunks) * k > self._scratch.numel():
            chunks += 1
        rows = -(-n // chunks)
        if chunks == 1:
            return F.linear(x, kernels.w4_dequantize(weight, self._scratch[: n * k].view(n, k)))
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        for first in range(0, n, rows):
            last = min(first + rows, n)
            part = kernels.w4_dequantize(weight.rows(first, last), self._scratch[: (last - first) * k].view(-1, k))
            torch.mm(x, part.t(), out=out[:, first:last])  # cuBLAS writes the column block in place
        return out

    def _gate_and_up(self, h: torch.Tensor, gate_up) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(gate_up, Int4Weight) and not self._uses_w4_gemm(h.shape[0], gate_up):
            # the fallback's scratch holds half of the fused matrix: one product per half
            half = gate_up.out_features // 2
            return self._linear(h, gate_up.rows(0, half)), self._linear(h, gate_up.rows(half, 2 * half))
        return self._linear(h, gate_up).chunk(2, dim=-1)

    def prefill(self, embeds: torch.Tensor, start: int, positions: torch.Tensor | None = None,
                layer_additions: dict | None = None) -> int:  # fmt: skip
        """Run positions start..start+L-1 (embeds (L, H)), fill their KV; the next token (greedy,
        among those the token mask allows). positions, layer_additions: see prefill_logits."""
        # A step started ahead read the KV cache this prefill rewrites: its token is stale.
        self._started_ahead = None
        logits = self.prefill_logits(embeds, start, positions, layer_additions)
        return int(torch.argmax(self.token_mask.apply(logits)))

    def set_rope_offset(self, offset: int) -> None:
        """Decode steps rotate the token of cache slot p as position p + offset (Qwen2.5-VL:
        the text after an image runs behind its slot by rope_deltas); 0 for every other model."""
        self._rope_offset.fill_(offset)

    def set_token_mask(self, words) -> None:
        """The tokens the next choice may take (token_mask.py's layout); None = all. A step
        started ahead chose without this mask: it is dropped. (Called from decode_step's
        fill_mask while a step runs: the mask's copy is queued behind the step's layers.)"""
        if words is not None:
            self._started_ahead = None
        self.token_mask.set(words)

    @torch.inference_mode()
    def prefill_logits(self, embeds: torch.Tensor, start: int, positions: torch.Tensor | None = None,
                       layer_additions: dict | None = None) -> torch.Tensor:  # fmt: skip
        """Logits after the last of positions start..start+L-1 (their KV is written).

        positions: the rotary positions of these tokens, (S, L) integers, one row per rotary
        section (Qwen's time, height, width; a single row is used for all); by default the
        slots themselves shifted by the rope offset (set_rope_offset).
        layer_additions: {layer index: (rows (N,), values (N, H))}: added to those rows of the
        residual stream after that layer (Qwen3-VL's deepstack image features). Such a prefill
        runs eagerly (its graph would have to be keyed by the image rows too)."""
        length = embeds.shape[0]
        if start + length > self.max_tokens:
            raise ValueError(f"{start + length} tokens exceed the KV cache of {self.max_tokens}")
        rows = self._rope_positions[:, start : start + length]
        if positions is None:
            rows.copy_(torch.arange(start, start + length, dtype=torch.int32, device=self.device).expand_as(rows))
            rows += self._rope_offset
        else:
            if positions.dim() != 2 or positions.shape[0] not in (1, rows.shape[0]) or positions.shape[1] != length:
                raise ValueError(f"positions {tuple(positions.shape)} for {length} tokens in {rows.shape[0]} sections")
            rows.copy_(positions.expand_as(rows))
        x = embeds.to(torch.float16)
        if self._prefill_graphs is not None and not layer_additions:
            return self._prefill_graphs(x, start)
        last_index = torch.full((1,), length - 1, dtype=torch.long, device=self.device)
        return self._prefill_body(x, start, last_index, layer_additions)

    def _prefill_body(self, x: torch.Tensor, start: int | torch.Tensor, last_index: torch.Tensor,
                      layer_additions: dict | None = None) -> torch.Tensor:  # fmt: skip
        """Positions start..start+L-1 from embeddings x (L, H) fp16; the logits of row
        `last_index` (a GPU tensor, so a CUDA graph can be padded past the real prompt).

        `start` an int: attention reads the cache up to start + L. `start` an int32 device tensor
        (1,): nothing here depends on its value on the host, so one CUDA graph serves every start
        (follow-up turns, prefill_graphs.py): rotary positions are gathered from the slots, and
        attention reads the whole cache through a causal mask built on the GPU."""
        length = x.shape[0]
        q = torch.empty(length, self.n_heads, self.head_dim, dtype=torch.float16, device=self.device)
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(length, dtype=torch.int32, device=self.device)
            positions = self._rope_positions.index_select(1, slots.long())
            keys = torch.arange(self.max_tokens, dtype=torch.int32, device=self.device)
            mask, end = keys[None, :] <= slots[:, None], self.max_tokens
        else:
            positions = self._rope_positions[:, start : start + length]  # written by prefill_logits
            end = start + length
            mask = None
            if start > 0:  # queries sit at the end of the keys: causal, aligned bottom-right
                mask = torch.ones(length, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        for index, layer in enumerate(self.layers):
            h = kernels.rmsnorm(x, layer.input_norm, self.eps, bias=layer.input_norm_bias)
            qkv = self._attention_inputs(self._linear(h, layer.qkv), layer)
            kernels.rope_and_cache(
                qkv, positions, self.inv_freq, self.attention_scaling, self.k_cache[index], self.v_cache[index],
                q, self.n_heads, self.n_kv_heads, start=start, sections=self.rotary.sections,
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
            h = kernels.rmsnorm(x, layer.post_norm, self.eps, bias=layer.post_norm_bias)
            gate, up = self._gate_and_up(h, layer.gate_up)
            x = x + self._linear(F.silu(gate) * up, layer.down)
            if layer_additions and index in layer_additions:
                rows, values = layer_additions[index]
                x[rows] = x[rows] + values.to(x.dtype)
        last = kernels.rmsnorm(x.index_select(0, last_index), self.final_norm, self.eps, bias=self.final_norm_bias)
        return self._logits_of(last[0])

    def _attention_inputs(self, qkv: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """The fused q, k, v rows (M, (Hq + 2 Hkv) D) with the family's extras applied in place:
        the qkv bias (Qwen2), then an RMSNorm over each head of q and of k (Qwen3)."""
        if layer.qkv_bias is not None:
            qkv += layer.qkv_bias
        if layer.q_norm is not None:
            rows, d = qkv.shape[0] if qkv.dim() == 2 else 1, self.head_dim
            q_width, k_width = self.n_heads * d, self.n_kv_heads * d
            flat = qkv.view(rows, -1)
            for offset, width, weight in ((0, q_width, layer.q_norm), (q_width, k_width, layer.k_norm)):
                heads = flat[:, offset : offset + width]
                if rows == 1:  # one token (decode): a contiguous block, normalised in place
                    kernels.rmsnorm(heads.view(-1, d), weight, self.eps, out=heads.view(-1, d))
                else:
                    heads.copy_(kernels.rmsnorm(heads.reshape(-1, d), weight, self.eps).view(rows, width))
        return qkv

    # ---- decode ---------------------------------------------------------------------------

    def _gemv(self, x, weight, out, gated=False):
        if not isinstance(weight, Int4Weight):
            y = F.linear(x, weight)
            if gated:
                gate, up = y.chunk(2)
                y = F.silu(gate) * up
            return out.copy_(y)
        config = self._gemv_configs.get((weight.out_features, weight.in_features, gated), kernels.DEFAULT_GEMV_CONFIG)
        return kernels.w4_gemv(x, weight, out, gated=gated, config=config)

    def _gemv_partials(self, x, weight, name: str) -> torch.Tensor:
        """W x as the (S, N) float32 shares of a K split (S = 1 for fp16 weights), for
        rmsnorm(partials=) to add to the residual stream."""
        partials = self._partials[name]
        if not isinstance(weight, Int4Weight):
            partials[0].copy_(F.linear(x, weight))
            return partials
        return kernels.w4_gemv_partials(x, weight, partials, self._partial_config(name))

    def _partial_config(self, name: str) -> tuple[int, ...]:
        """The tuned GEMV configuration of "o" or "down" (its K split sizes their partials)."""
        return self._partial_configs.get(name, kernels.DEFAULT_GEMV_CONFIG)

    def _decode_step_body(self) -> None:
        """The graph body: reads self._token and self._position, writes self._token (greedy,
        among the tokens the mask allows)."""
        self._decode_step_logits()
        self._choose_token()

    def _choose_token(self) -> None:
        kernels.greedy_advance(self._logits, self.token_mask.words, self._token, self._position, self._length)

    def _decode_step_logits(self) -> None:
        """The step up to its logits: reads self._token and self._position, writes self._logits.
        The o and down products reach the residual stream x through the next RMSNorm, which
        adds their K-split shares first."""
        x = self._x
        kernels.embed_token(self._token, self.embed_tokens, out=x)
        down = None
        for index, layer in enumerate(self.layers):
            h = kernels.rmsnorm(x, layer.input_norm, self.eps, out=self._h, partials=down, bias=layer.input_norm_bias)
            qkv = self._attention_inputs(self._gemv(h, layer.qkv, self._qkv), layer)
            kernels.decode_rope_attention(
                qkv, self._position, self.inv_freq, self.attention_scaling, self.k_cache[index], self.v_cache[index],
                self._length, self._attention, self.n_heads, self._attention_workspace, rope_offset=self._rope_offset,
            )  # fmt: skip
            o = self._gemv_partials(self._attention.view(-1), layer.o, "o")
            h = kernels.rmsnorm(x, layer.post_norm, self.eps, out=self._h, partials=o, bias=layer.post_norm_bias)
            act = self._gemv(h, layer.gate_up, self._act, gated=True)
            down = self._gemv_partials(act, layer.down, "down")
        last = kernels.rmsnorm(x, self.final_norm, self.eps, out=self._h, partials=down, bias=self.final_norm_bias)
        self._logits_of(last, out=self._logits)

    def _allocate_decode_buffers(self) -> None:
        device, half = self.device, torch.float16
        self._token = torch.zeros(1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.int32, device=device)
        self._length = torch.ones(1, dtype=torch.int32, device=device)
        self._x = torch.zeros(self.hidden, dtype=half, device=device)
        self._h = torch.zeros(self.hidden, dtype=half, device=device)
        self._qkv = torch.zeros((self.n_heads + 2 * self.n_kv_heads) * self.head_dim, dtype=half, device=device)
        self._attention = torch.zeros(self.n_heads, self.head_dim, dtype=half, device=device)
        self._act = torch.zeros(self.intermediate, dtype=half, device=device)
        self._logits = torch.zeros(self.vocab_size, dtype=half, device=device)
        self._attention_workspace = kernels.attention_workspace(self.n_heads, self.head_dim, self.max_tokens, device)
        self._partials = {
            name: torch.zeros(self._partial_config(name)[3], self.hidden, device=device) for name in ("o", "down")
        }
        self._host_token = -1  # what self._token holds, as far as the host knows (-1: unknown)
        self._host_position = -1
        self._started_ahead: tuple[int, int] | None = None  # (token, position) of a step already launched
        self._token_on_host = torch.zeros(1, dtype=torch.long, pin_memory=device.type == "cuda")
        self._token_copied = torch.cuda.Event() if device.type == "cuda" else None

    def tune_gemv(self) -> dict:
        """Pick the fastest GEMV launch configuration for each 4-bit matrix (o and down may split
        K: they write shares). Each candidate is timed as a CUDA graph that runs that matrix of
        every layer in turn, so the weights stream from memory as in the decode step: one
        layer's matrix alone would sit in the L2 cache (50 MB on an H100) and favour
        configurations that lose on the real stream."""
        if not self.quantized:
            return {}
        x = torch.randn(max(self.hidden, self.intermediate), dtype=torch.float16, device=self.device)
        for name, gated in (("qkv", False), ("o", False), ("gate_up", True), ("down", False)):
            weights = [getattr(layer, name) for layer in self.layers]
            inputs = x[: weights[0].in_features]
            writes_partials = name in ("o", "down")
            timings = {}
            for config in kernels.QUICK_GEMV_CONFIGS:
                if config[3] > 1 and not writes_partials:
                    continue
                if writes_partials:
                    partials = torch.empty(config[3], weights[0].out_features, device=self.device)

                    def run(config=config, partials=partials, weights=weights, inputs=inputs):
                        for weight in weights:
                            kernels.w4_gemv_partials(inputs, weight, partials, config)
                else:

                    def run(config=config, weights=weights, inputs=inputs, gated=gated):
                        for weight in weights:
                            kernels.w4_gemv(inputs, weight, gated=gated, config=config)

                timings[config] = graph_time_us(run, calls=1, replays=11)  # medians: the leaders differ by 1-2%
            best = min(timings, key=timings.get)
            if writes_partials:
                self._partial_configs[name] = best
            else:
                self._gemv_configs[(weights[0].out_features, weights[0].in_features, gated)] = best
        return {**{str(key): value for key, value in self._gemv_configs.items()}, **self._partial_configs}

    def capture(self, tune: bool = True) -> float:
        """Tune (the first time, unless `tune` is False: the default GEMV configuration), warm up
        and capture the decode step; returns the seconds it took."""
        started = time.perf_counter()
        if tune and not self._gemv_configs:
            self.tune_gemv()
        self._allocate_decode_buffers()
        stream = torch.cuda.Stream()  # warm-ups run here (the prefill graphs' too)
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
        # The same step in two graphs, for constrained answers: the host fills the token mask
        # while the GPU runs the layers, then the choice reads it (see decode_step's fill_mask).
        self._logits_graph, self._choose_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._logits_graph), torch.inference_mode():
            self._decode_step_logits()
        with torch.cuda.graph(self._choose_graph), torch.inference_mode():
            self._choose_token()
        torch.cuda.synchronize()
        self._warmup_stream = stream
        self._prefill_graphs = PrefillGraphs(self._prefill_body, self.hidden, self.max_tokens, self.device, stream)
        return time.perf_counter() - started

    def decode_step(self, token: int, position: int, *, more: bool = False, fill_mask=None) -> int:
        """Feed `token` at `position`; the next token (greedy).

        fill_mask: a function that sets this choice's token mask (set_token_mask), called after
        the step's layers are launched and before its choice is: the host's grammar work overlaps
        the GPU's (a 7B step is 1.7 ms; a JSON mask 60-70 µs of host time). Not with `more`.

        more: the caller will probably feed the returned token back at position + 1. That step
        is then started on the GPU before this one's token is read, so the GPU does not idle
        while the host reads the token and launches the next step (about 1% of a 7B step on an
        H100). If the caller asks for something else instead, the extra step is harmless: it
        only wrote the KV cache past `position` + 1, which attention never reads before it is
        written again, and the device-side token and position, which are then set afresh."""
        if self._graph is None:
            # Capturing warms up at position 0, which would overwrite a prompt's KV: do it first.
            raise RuntimeError("call capture() once after loading, before the first prefill")
        # A constrained step needs its mask before its choice: it cannot be started ahead.
        assert not (more and (fill_mask or not self.token_mask.unconstrained)), "more=True with a token mask"
        more = more and position + 2 <= self.max_tokens  # the extra step's KV slot must exist
        if fill_mask is not None:
            self._started_ahead = None  # a step started ahead chose without this step's mask
        if (token, position) != self._started_ahead:
            # The graph leaves its own output token and the next position on the GPU: only
            # write them when the caller asks for something else (the first step after a prefill).
            if token != self._host_token:
                self._token.fill_(token)
            if position != self._host_position:
                self._position.fill_(position)
                self._length.fill_(position + 1)
            if fill_mask is None:
                self._graph.replay()
            else:
                self._logits_graph.replay()
                fill_mask()  # on the host, while the GPU runs the layers; its copy is stream-ordered
                self._choose_graph.replay()
        self._token_on_host.copy_(self._token, non_blocking=True)  # before a next step overwrites it
        self._token_copied.record()
        if more:
            self._graph.replay()
        self._token_copied.synchronize()
        next_token = int(self._token_on_host[0])
        if more:  # the GPU's token is the extra step's output, unknown here
            self._started_ahead = (next_token, position + 1)
            self._host_token, self._host_position = -1, position + 2
        else:
            self._started_ahead = None
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


def _llama_rotary_parameters(config, device) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as transformers computes them (RoPE scaling too)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    return rotary.inv_freq.float().to(device), float(rotary.attention_scaling)


def _frequency_sections(rotary_emb) -> torch.Tensor:
    """Which row of the position ids each frequency reads, asked of the module itself: Qwen's
    multimodal rotary modules recombine per-section frequency tables (recomposition_frequencies;
    Qwen2.5-VL in contiguous blocks, Qwen3-VL interleaved), so feeding them a table whose row s
    holds s gives the section of every frequency. Plain rotary modules: all 0."""
    frequencies = rotary_emb.inv_freq.numel()
    recompose = getattr(rotary_emb, "recomposition_frequencies", None)
    if recompose is None:
        return torch.zeros(frequencies, dtype=torch.int32)
    rows = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 1, frequencies).clone()
    return recompose(rows)[0, 0, :frequencies].round().to(torch.int32).cpu()


def _progress(iterable, progress):
    return progress(iterable) if progress else iterable
