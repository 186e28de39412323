"""The GPU fast path's Triton kernels and FastLlama, run on the CPU by Triton's interpreter
(TRITON_INTERPRET=1), against float references and transformers' Llama. The same checks run on
an H100 in bench/check_gpu.py at real shapes; speed is measured there, not here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process
triton = pytest.importorskip("triton")

from ros2_nanovlm.engine.cuda import fast_llama, kernels, w4_gemm  # noqa: E402
from ros2_nanovlm.engine.cuda.fast_llama import FastLlama  # noqa: E402
from ros2_nanovlm.engine.quant.int4 import dequantize_int4, quantize_int4  # noqa: E402
from ros2_nanovlm.engine.quant.int8 import dequantize_int8_rows, quantize_int8_rows  # noqa: E402
from ros2_nanovlm.engine.token_mask import words_allowing  # noqa: E402


def relative_error(value, reference) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("rows, features", [(24, 256), (40, 576), (30, 1536)])
@pytest.mark.parametrize("config", [(1, 128, 1, 1, 3), (2, 256, 1, 1, 0), (8, 128, 2, 1, 1), (4, 128, 1, 1, 0)])
def test_w4_gemv_plain_and_gated(rows, features, config):
    torch.manual_seed(rows + features)
    packed = quantize_int4(torch.randn(rows, features))
    x = torch.randn(features).half()
    reference = dequantize_int4(packed) @ x.float()
    assert relative_error(kernels.w4_gemv(x, packed, config=config), reference) < 2e-3
    half = rows // 2
    out = torch.full((half,), float("nan")).half()
    gated = kernels.w4_gemv(x, packed, out=out, gated=True, config=config)
    expected = F.silu(reference[:half]) * reference[half:]
    assert relative_error(gated, expected) < 2e-3


@pytest.mark.parametrize("rows, features", [(24, 256), (40, 576), (30, 1536)])
@pytest.mark.parametrize("config", [(4, 128, 1, 2, 2), (2, 128, 1, 4, 0), (1, 256, 1, 3, 1)])
def test_w4_gemv_partials_split_k_and_sum_to_the_product(rows, features, config):
    torch.manual_seed(rows * features)
    packed = quantize_int4(torch.randn(rows, features))
    x = torch.randn(features).half()
    partials = torch.full((config[3], rows), float("nan"))  # every share must be written
    kernels.w4_gemv_partials(x, packed, partials, config)
    assert relative_error(partials.sum(0), dequantize_int4(packed) @ x.float()) < 2e-3
    with pytest.raises(ValueError, match="float32"):
        kernels.w4_gemv_partials(x, packed, torch.zeros(config[3] + 1, rows), config)
    with pytest.raises(ValueError, match="w4_gemv_partials"):
        kernels.w4_gemv(x, packed, config=config)


def test_rmsnorm_adds_the_partials_to_the_residual_first():
    torch.manual_seed(3)
    x, weight = torch.randn(96).half(), torch.randn(96).half()
    partials = torch.randn(3, 96)
    expected_x = (x.float() + partials.sum(0)).half()
    expected = (
        expected_x.float() * torch.rsqrt(expected_x.float().pow(2).mean() + 1e-5)
    ).half().float() * weight.float()
    out = kernels.rmsnorm(x, weight, 1e-5, partials=partials)
    assert torch.equal(x, expected_x)  # x was updated in place
    assert relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("rows, features", [(40, 128), (37, 576), (16, 1536)])
def test_i8_gemv_and_int8_rows(rows, features):
    torch.manual_seed(rows)
    weight = torch.randn(rows, features) * 0.05
    head = quantize_int8_rows(weight)
    # half a step of max|row|/127 at most, per element
    assert ((dequantize_int8_rows(head) - weight).abs() <= weight.abs().amax(1, keepdim=True) / 254 + 1e-4).all()
    x = torch.randn(features).half()
    assert relative_error(kernels.i8_gemv(x, head), dequantize_int8_rows(head) @ x.float()) < 2e-3
    ids = torch.tensor([3, 0, 3])
    assert torch.equal(head.rows(ids), dequantize_int8_rows(head, torch.float16)[ids])


def test_embed_token_matches_the_table_lookup():
    table = torch.randn(50, 96).half()
    rows = quantize_int8_rows(torch.randn(50, 96))
    token = torch.tensor([37])
    assert torch.equal(kernels.embed_token(token, table, torch.full((96,), float("nan")).half()), table[37])
    assert torch.equal(kernels.embed_token(token, rows, torch.full((96,), float("nan")).half()), rows.rows(token)[0])


def test_greedy_advance_takes_the_first_maximum_and_moves_one_position_on():
    logits = torch.randn(40000).half()  # two blocks of the kernel
    all_tokens = torch.full((1250,), -1, dtype=torch.int32)
    token, position, length = (
        torch.tensor([-1]),
        torch.tensor([9], dtype=torch.int32),
        torch.tensor([10], dtype=torch.int32),
    )
    logits[35000] = logits[5] = logits.max() + 1  # equal maxima in two blocks: the first wins, as torch.argmax
    kernels.greedy_advance(logits, all_tokens, token, position, length)
    assert token.item() == 5 == torch.argmax(logits).item()
    assert (position.item(), length.item()) == (10, 11)
    logits[35001] = logits[5] + 1
    kernels.greedy_advance(logits, all_tokens, token, position, length)
    assert (token.item(), position.item(), length.item()) == (35001, 11, 12)


def test_greedy_advance_chooses_only_among_the_tokens_the_mask_allows():
    logits = torch.randn(40000).half()
    allowed = torch.tensor([3, 31, 32, 33000, 39999])
    mask = torch.from_numpy(words_allowing(allowed.tolist(), 40000))
    token, position, length = torch.tensor([-1]), torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    kernels.greedy_advance(logits, mask, token, position, length)
    assert token.item() == allowed[torch.argmax(logits[allowed])].item()
    logits[allowed] = -1000.0  # the allowed tokens are the least likely: still one of them
    logits[33000] = -999.0
    kernels.greedy_advance(logits, mask, token, position, length)
    assert token.item() == 33000


def test_w4_dequantize_matches_the_reference():
    packed = quantize_int4(torch.randn(32, 512))
    out = torch.empty(32, 512, dtype=torch.float16)
    assert relative_error(kernels.w4_dequantize(packed, out), dequantize_int4(packed)) < 1e-3


@pytest.mark.parametrize(
    "tokens, rows, features, group, config",
    [
        (37, 80, 384, 128, (32, 16, 4, 1, 0)),  # tokens and rows not multiples of the blocks; 3 groups
        (5, 64, 192, 64, (64, 16, 4, 2, 0)),  # fewer tokens than a block; groups of 64
        (50, 96, 512, 128, (64, 32, 4, 3, 0)),  # 4 groups, two blocks of rows, two of tokens
        (16, 48, 256, 128, None),  # the table's configuration for 16 tokens (64 rows: one masked block)
        (19, 40, 160, 32, (32, 16, 4, 2, 0)),  # groups of 32 (5 of them)
        # stream-K: 4, 6 and 2 programs (2 "SMs" here) share 27 steps; tiles cut between 2 or 3 programs
        (37, 80, 384, 128, (32, 16, 4, 1, 2)),
        (37, 80, 384, 128, (32, 16, 4, 1, 3)),
        (37, 80, 384, 128, (32, 16, 4, 1, 1)),
        (5, 64, 192, 64, (32, 16, 4, 2, 2)),  # 2 tiles, 6 steps, 4 programs
        (50, 96, 512, 128, (64, 32, 4, 3, 3)),  # 16 steps, 6 programs
    ],
)
def test_w4_gemm_matches_the_float_reference(tokens, rows, features, group, config):
    """The prefill GEMM (weights dequantized in registers, tl.dot) against dequantize-then-matmul
    in float32; every output element is written (the output starts as NaN). Stream-K leaves its
    flags reset and gives the same bits on a second run."""
    torch.manual_seed(tokens * rows)
    weight = quantize_int4(torch.randn(rows, features), group)
    x = torch.randn(tokens, features).half()
    out = torch.full((tokens, rows), float("nan")).half()
    result = w4_gemm.w4_gemm(x, weight, out, config=config)
    assert result is out and not torch.isnan(out).any()
    assert relative_error(out, x.float() @ dequantize_int4(weight).T) < 2e-3
    if config and config[4]:
        assert not w4_gemm._workspaces[torch.device("cpu")][1].any()
        assert torch.equal(w4_gemm.w4_gemm(x, weight, config=config), out)


def test_w4_gemm_refuses_what_it_cannot_run():
    weight = quantize_int4(torch.randn(16, 512), 256)
    assert "group size 256" in w4_gemm.w4_gemm_unsupported(weight)
    with pytest.raises(ValueError, match="group size"):
        w4_gemm.w4_gemm(torch.randn(3, 512).half(), weight)
    with pytest.raises(ValueError, match="features"):
        w4_gemm.w4_gemm(torch.randn(3, 256).half(), quantize_int4(torch.randn(16, 128)))


def test_w4_gemm_configurations_fit_the_shared_memory():
    """Stages, then tokens a block, are dropped until a configuration fits the GPU's shared memory
    per block (Jetson Orin: 163 KB); the table's configurations all fit an H100/H200 (227 KB)."""
    for _, config in w4_gemm.W4_GEMM_TABLE:
        assert w4_gemm.fit_stages(config, 128, 227 * 1024) == config
        fitted = w4_gemm.fit_stages(config, 128, 163 * 1024)
        assert (fitted[0], fitted[2], fitted[4]) == (config[0], config[2], config[4])  # rows, warps, programs
        assert fitted[3] >= 2 and w4_gemm.shared_memory_bound(fitted, 128) <= 163 * 1024
    assert w4_gemm.fit_stages((128, 256, 8, 3, 1), 128, 99 * 1024) == (128, 128, 8, 2, 1)  # an A10
    assert w4_gemm.w4_gemm_config(1) == w4_gemm.W4_GEMM_TABLE[0][1]
    assert w4_gemm.w4_gemm_config(10**6) == w4_gemm.W4_GEMM_TABLE[-1][1]


def test_rmsnorm_as_transformers_computes_it():
    x, weight = torch.randn(3, 576).half(), torch.randn(576).half()
    normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).half().float()
    assert relative_error(kernels.rmsnorm(x, weight, 1e-5), normed * weight.float()) < 1e-3


def test_rope_and_cache_write_match_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_q, n_kv, dim, tokens = 4, 2, 16, 3
    qkv = torch.randn(tokens, (n_q + 2 * n_kv) * dim).half()
    positions = torch.tensor([5, 6, 7], dtype=torch.int32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    k_cache, v_cache = torch.zeros(n_kv, 32, dim).half(), torch.zeros(n_kv, 32, dim).half()
    q_out = torch.empty(tokens, n_q, dim).half()
    kernels.rope_and_cache(qkv, positions, inv_freq, 1.0, k_cache, v_cache, q_out, n_q, n_kv)
    angles = torch.cat([positions[:, None].float() * inv_freq] * 2, -1)
    q = qkv[:, : n_q * dim].view(tokens, n_q, dim).transpose(0, 1)[None].float()
    k = qkv[:, n_q * dim : (n_q + n_kv) * dim].view(tokens, n_kv, dim).transpose(0, 1)[None].float()
    q_rotated, k_rotated = apply_rotary_pos_emb(q, k, angles.cos()[None], angles.sin()[None])
    assert relative_error(q_out.transpose(0, 1), q_rotated[0]) < 1e-3
    assert relative_error(k_cache[:, 5:8], k_rotated[0]) < 1e-3
    v = qkv[:, (n_q + n_kv) * dim :].view(tokens, n_kv, dim).transpose(0, 1)
    assert torch.equal(v_cache[:, 5:8], v)
    assert not k_cache[:, :5].any() and not k_cache[:, 8:].any()  # nothing else written


@pytest.mark.parametrize("cache_tokens, length", [(32, 19), (512, 300), (512, 1)])
def test_decode_attention_reads_only_up_to_length(cache_tokens, length):
    n_q, n_kv, dim = 4, 2, 16
    k_cache, v_cache = torch.randn(n_kv, cache_tokens, dim).half(), torch.randn(n_kv, cache_tokens, dim).half()
    k_cache[:, length:] = float("nan")  # stale entries past the length must not be read
    q = torch.randn(n_q, dim).half()
    keys = k_cache[:, :length].repeat_interleave(n_q // n_kv, 0).float()
    values = v_cache[:, :length].repeat_interleave(n_q // n_kv, 0).float()
    reference = torch.softmax(q.float()[:, None] @ keys.transpose(1, 2) / dim**0.5, -1) @ values
    workspace = kernels.attention_workspace(n_q, dim, cache_tokens, q.device)
    for _ in range(2):  # the last slice of each head merges, then resets the head's counter
        out = torch.full((n_q, dim), float("nan")).half()
        kernels.decode_attention(q, k_cache, v_cache, torch.tensor([length], dtype=torch.int32), out, workspace)
        assert relative_error(out, reference[:, 0]) < 2e-3
        assert not workspace[2].any()


@pytest.mark.parametrize("heads, kv_heads, position", [(4, 4, 40), (4, 2, 0), (8, 2, 63)])
def test_decode_rope_attention_equals_rope_then_attention(heads, kv_heads, position):
    """The decode step's fused kernel: rotate q and k of the new token, write k and v into the
    cache at its position, attend over positions 0..position; as the two kernels do it."""
    torch.manual_seed(position)
    dim, tokens = 16, 64
    qkv = torch.randn((heads + 2 * kv_heads) * dim).half()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    caches = torch.randn(2, kv_heads, tokens, dim).half()
    pos, length = torch.tensor([position], dtype=torch.int32), torch.tensor([position + 1], dtype=torch.int32)
    k_ref, v_ref, q = caches[0].clone(), caches[1].clone(), torch.empty(1, heads, dim).half()
    kernels.rope_and_cache(qkv[None], pos, inv_freq, 1.0, k_ref, v_ref, q, heads, kv_heads)
    expected = kernels.decode_attention(q[0], k_ref, v_ref, length, torch.empty(heads, dim).half())
    k_cache, v_cache = caches[0].clone(), caches[1].clone()
    out = torch.full((heads, dim), float("nan")).half()
    kernels.decode_rope_attention(qkv, pos, inv_freq, 1.0, k_cache, v_cache, length, out, heads)
    assert relative_error(out, expected) < 1e-3
    assert relative_error(k_cache, k_ref) < 1e-3 and torch.equal(v_cache, v_ref)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("quantize", [False, True])
def test_fast_llama_prefill_split_and_decode_step(tiny_llama, quantize):
    """Prefill in two pieces (prefix reuse) equals prefill in one; the decode step body (what
    the CUDA graph captures) equals prefill; fp16 FastLlama equals transformers."""
    ids = torch.randint(0, 512, (20,))
    with torch.inference_mode():
        reference = tiny_llama(ids[None]).logits[0, -1].float()
        lm = FastLlama.from_hf(
            tiny_llama.model, tiny_llama.lm_head, max_tokens=64, quantize=quantize, device=torch.device("cpu")
        )
        if quantize:  # o and down write K-split shares that the next RMSNorm adds
            lm._partial_configs = {"o": (2, 128, 1, 2, 1), "down": (4, 128, 1, 2, 0)}
        embeds = lm.embed(ids)
        whole = lm.prefill_logits(embeds, 0)
        lm.prefill_logits(embeds[:12], 0)
        assert relative_error(lm.prefill_logits(embeds[12:], 12), whole) < 2e-3
        if not quantize:
            assert relative_error(whole, reference) < 5e-3
        lm._allocate_decode_buffers()
        lm.prefill_logits(embeds[:19], 0)
        lm._token.fill_(int(ids[19]))
        lm._position.fill_(19)
        lm._length.fill_(20)
        lm._decode_step_body()
        assert relative_error(lm._logits, whole) < 2e-3
        assert int(lm._token) == int(whole.argmax()) and int(lm._position) == 20


@pytest.mark.parametrize("start", [0, 7])
def test_fast_llama_padded_prefill_equals_the_exact_one(tiny_llama, start):
    """What a prefill CUDA graph runs: the prompt padded with zero embeddings to a multiple of
    64 tokens, logits read at the last real row. Same logits, same KV for the real positions,
    and a decode step after it continues as after the exact prefill."""
    ids = torch.randint(0, 512, (start + 21,))
    with torch.inference_mode():
        lm = FastLlama.from_hf(
            tiny_llama.model, tiny_llama.lm_head, max_tokens=128, quantize=True, device=torch.device("cpu")
        )
        embeds = lm.embed(ids).half()
        lm.prefill_logits(embeds[:start], 0) if start else None
        exact = lm.prefill_logits(embeds[start:], start)
        end = start + 21
        exact_cache = lm.k_cache[:, :, :end].clone(), lm.v_cache[:, :, :end].clone()

        padded = torch.zeros(64, embeds.shape[1], dtype=torch.float16)
        padded[:21] = embeds[start:]
        last_index = torch.tensor([20])
        logits = lm._prefill_body(padded, start, last_index)
        assert relative_error(logits, exact) < 1e-3
        assert relative_error(lm.k_cache[:, :, :end], exact_cache[0]) < 1e-3
        assert relative_error(lm.v_cache[:, :, :end], exact_cache[1]) < 1e-3
        assert torch.isfinite(lm.k_cache).all() and torch.isfinite(lm.v_cache).all()  # padding wrote finite KV

        lm._allocate_decode_buffers()
        lm._token.fill_(int(exact.argmax()))
        lm._position.fill_(end)
        lm._length.fill_(end + 1)
        lm._decode_step_body()
        following = lm.prefill_logits(torch.cat([embeds[start:], lm.embed(exact.argmax()[None]).half()]), start)
        assert relative_error(lm._logits, following) < 2e-3


def test_a_follow_up_prefill_reading_its_start_from_the_device_equals_the_exact_one(tiny_llama):
    """What the follow-up turns' prefill graph runs (prefill_graphs.py, ANY_START): the start as
    a device tensor, the turn padded to 64 tokens, attention over the whole cache through a
    causal mask. Same logits and the same KV for the turn's positions as the exact prefill."""
    ids = torch.randint(0, 512, (30,))
    with torch.inference_mode():
        lm = FastLlama.from_hf(
            tiny_llama.model, tiny_llama.lm_head, max_tokens=128, quantize=False, device=torch.device("cpu")
        )
        embeds = lm.embed(ids).half()
        lm.prefill_logits(embeds[:19], 0)
        exact = lm.prefill_logits(embeds[19:], 19)
        exact_cache = lm.k_cache[:, :, :30].clone(), lm.v_cache[:, :, :30].clone()

        lm.prefill_logits(embeds[:19], 0)
        lm.k_cache[:, :, 30:] = 0.5  # stale keys past the turn must stay masked
        padded = torch.zeros(64, embeds.shape[1], dtype=torch.float16)
        padded[:11] = embeds[19:]
        logits = lm._prefill_body(padded, torch.tensor([19], dtype=torch.int32), torch.tensor([10]))
        assert relative_error(logits, exact) < 1e-3
        assert relative_error(lm.k_cache[:, :, :30], exact_cache[0]) < 1e-3
        assert relative_error(lm.v_cache[:, :, :30], exact_cache[1]) < 1e-3


def test_dropping_unused_vision_layers_keeps_the_image_features(tiny_llava):
    """The fast path drops the vision layers after the one LLaVA reads (vision_feature_layer)."""
    from transformers import AutoModelForImageTextToText

    from ros2_nanovlm.engine.cuda.loading import _drop_unused_vision_layers
    from ros2_nanovlm.engine.hf.vision import image_features

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    pixels = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)

    def features():
        return image_features(model, pixels, vision_feature_layer=model.config.vision_feature_layer,
                              vision_feature_select_strategy=model.config.vision_feature_select_strategy)  # fmt: skip

    with torch.inference_mode():
        before, layers = features(), len(model.model.vision_tower.encoder.layers)
        assert model.config.vision_feature_layer == -2
        _drop_unused_vision_layers(model)
        assert len(model.model.vision_tower.encoder.layers) == layers - 1
        assert torch.equal(features(), before)


def test_fast_llava_from_model_round_trips_the_weights(tiny_llava):
    """The loader re-places the converted weights through state_dict/from_state (the path the
    on-disk 4-bit cache takes too): same 4-bit and int8 tensors, same logits."""
    from transformers import AutoModelForImageTextToText

    from ros2_nanovlm.engine.cuda.loading import fast_llava_from_model
    from ros2_nanovlm.engine.quant.int8 import Int8Rows

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    direct = FastLlama.from_hf(
        model.model.language_model, model.lm_head, max_tokens=64, quantize=True, device=torch.device("cpu")
    )
    loaded = fast_llava_from_model(model, torch.device("cpu"), quantize=True, max_tokens=64)
    assert isinstance(loaded.lm_head, Int8Rows) and isinstance(loaded.embed_tokens, Int8Rows)
    for name, tensor in direct.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(0, direct.embed_tokens.out_features, (9,))
    with torch.inference_mode():
        assert torch.equal(loaded.prefill_logits(loaded.embed(ids), 0), direct.prefill_logits(direct.embed(ids), 0))


def test_fast_llama_prefill_with_the_w4_gemm_equals_the_fallback(tiny_llama, monkeypatch):
    """4-bit prefill through w4_gemm (the default up to W4_GEMM_MAX_TOKENS tokens), through
    dequantize + matmul (above it, set_w4_gemm(False) or NANOVLM_W4_GEMM=0), and after w4_gemm
    fails to build (the fallback, taken once, loudly): the same logits."""
    ids = torch.randint(0, 512, (23,))
    with torch.inference_mode():
        lm = FastLlama.from_hf(
            tiny_llama.model, tiny_llama.lm_head, max_tokens=64, quantize=True, device=torch.device("cpu")
        )
        embeds = lm.embed(ids)
        assert lm.w4_gemm_disabled == ""
        with_gemm = lm.prefill_logits(embeds, 0)
        assert lm._scratch is None  # the fallback's buffer is made only when it is used
        lm.set_w4_gemm(False)
        fallback = lm.prefill_logits(embeds, 0)
        assert lm._scratch is not None
        assert relative_error(with_gemm, fallback) < 2e-3
        lm.set_w4_gemm(True)
        assert torch.equal(lm.prefill_logits(embeds, 0), with_gemm)
        calls, real = [], fast_llama.w4_gemm
        monkeypatch.setattr(
            fast_llama, "w4_gemm", lambda x, *args, **kwargs: calls.append(len(x)) or real(x, *args, **kwargs)
        )
        monkeypatch.setattr(w4_gemm, "W4_GEMM_MAX_TOKENS", 16)
        assert torch.equal(lm.prefill_logits(embeds, 0), fallback) and not calls  # 23 tokens: the old path
        lm.prefill_logits(embeds[:16], 0)
        assert calls and set(calls) == {16}
        monkeypatch.undo()

        monkeypatch.setenv("NANOVLM_W4_GEMM", "0")
        forced = FastLlama.from_hf(
            tiny_llama.model, tiny_llama.lm_head, max_tokens=64, quantize=True, device=torch.device("cpu")
        )
        assert forced.w4_gemm_disabled == "NANOVLM_W4_GEMM=0"
        assert torch.equal(forced.prefill_logits(embeds, 0), fallback)
        monkeypatch.delenv("NANOVLM_W4_GEMM")

        def fails(*args, **kwargs):
            raise RuntimeError("PTX assembly failed")

        monkeypatch.setattr(fast_llama, "w4_gemm", fails)
        broken = FastLlama.from_hf(
            tiny_llama.model, tiny_llama.lm_head, max_tokens=64, quantize=True, device=torch.device("cpu")
        )
        assert torch.equal(broken.prefill_logits(embeds, 0), fallback)
        assert "PTX assembly failed" in broken.w4_gemm_disabled


COMPILE_W4_GEMM = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass
from ros2_nanovlm.engine.cuda import w4_gemm

arch, shared_memory = int(sys.argv[1]), int(sys.argv[2])
report = []
for config in sorted({config for _, config in w4_gemm.W4_GEMM_TABLE}):
    block_n, block_m, warps, stages, programs = w4_gemm.fit_stages(config, 128, shared_memory)
    constants = dict(K=4096, GROUP=128, BLOCK_N=block_n, BLOCK_M=block_m, HALF2=True, PDL=arch >= 90)
    pointers = {"x_ptr": "*fp16", "words_ptr": "*i32", "scales_ptr": "*fp16", "offsets_ptr": "*fp16",
                "out_ptr": "*fp16"}
    if programs:
        fn = w4_gemm._w4_gemm_stream_k_kernel
        pointers.update(shares_ptr="*fp32", flags_ptr="*i32")
        constants["INTERPRET"] = False
    else:
        fn = w4_gemm._w4_gemm_kernel
    signature = dict(pointers, M="i32", N="i32", **dict.fromkeys(constants, "constexpr"))
    attributes = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    source = ASTSource(fn=fn, signature=signature, attrs=attributes,
                       constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    sass = get_sass(compiled.asm["cubin"])
    report.append({"config": config, "shared": compiled.metadata.shared, "hgmma": sass.count("HGMMA."),
                   "hmma": sass.count("HMMA."), "tma": sass.count("UTMALDG")})
print(json.dumps(report))
"""


@pytest.mark.parametrize("arch, shared_memory, instruction", [(87, 163 * 1024, "hmma"), (90, 227 * 1024, "hgmma")])
def test_w4_gemm_compiles_for_jetson_orin_and_hopper(arch, shared_memory, instruction):
    """Every configuration of the table, with the half2 dequantization (inline PTX, which the
    interpreter cannot run), assembles for sm_87 (Jetson Orin: mma.sync) and sm_90 (wgmma) with
    Triton's bundled ptxas, fits the shared memory, and uses no TMA. Numbers: bench/check_gpu.py."""
    import json
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_W4_GEMM, str(arch), str(shared_memory)],
                            cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for entry in json.loads(result.stdout.strip().splitlines()[-1]):
        assert entry[instruction] > 0 and entry["tma"] == 0, entry
        assert entry["shared"] <= shared_memory, entry
