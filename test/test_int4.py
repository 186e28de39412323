"""The 4-bit weight format: packing round trip, error bounds, group sizes (pure torch)."""

import pytest
import torch

from ros2_nanovlm.engine.quant.int4 import _pack, _unpack, dequantize_int4, group_size_for, quantize_int4


def test_pack_and_unpack_are_inverse():
    q = torch.randint(0, 16, (6, 256))
    for group in (32, 64, 128):
        assert torch.equal(_unpack(_pack(q, group), group), q)


def test_nibbles_k_and_k_plus_4_of_a_word_hold_adjacent_inputs():
    """The layout the GEMV's half2 arithmetic relies on (quant/int4.py's docstring)."""
    q = torch.randint(0, 16, (3, 256))
    for group in (32, 64, 128):
        words = _pack(q, group).view(torch.int32).to(torch.int64).reshape(3, -1, group // 8)
        nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # (n, g, w, i)
        w = torch.arange(group // 8).view(-1, 1)
        i = torch.arange(8).view(1, -1)
        columns = 2 * (w + group // 8 * (i % 4)) + i // 4  # (w, i) within a group
        expected = q.reshape(3, -1, group)[:, :, columns]
        assert torch.equal(nibbles, expected)


def test_error_is_at_most_half_a_step_per_group():
    torch.manual_seed(0)
    weight = torch.randn(64, 512)
    packed = quantize_int4(weight, 128, clip_ratios=(1.0,))
    error = (dequantize_int4(packed) - weight).abs().reshape(64, 4, 128).amax(-1)
    assert torch.all(error <= packed.scales.float() / 2 + 1e-3)


def test_clip_search_never_increases_the_error():
    torch.manual_seed(1)
    weight = torch.randn(128, 1024) * torch.rand(128, 1)
    plain = quantize_int4(weight, clip_ratios=(1.0,))
    searched = quantize_int4(weight)
    plain_error = (dequantize_int4(plain) - weight).pow(2).sum()
    searched_error = (dequantize_int4(searched) - weight).pow(2).sum()
    assert searched_error <= plain_error


def test_a_weight_on_a_4bit_grid_is_kept_exactly():
    scale = torch.rand(16, 1) + 0.1
    weight = (torch.randint(0, 16, (16, 128)) * scale - 0.5).float()
    weight[:, 0], weight[:, 1] = -0.5, 15 * scale[:, 0] - 0.5  # both ends of the grid used
    restored = dequantize_int4(quantize_int4(weight.half().float(), 128))
    torch.testing.assert_close(restored, weight.half().float(), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("features, group", [(4096, 128), (11008, 128), (576, 64), (1536, 128), (96, 32)])
def test_group_size_follows_the_input_width(features, group):
    assert group_size_for(features) == group


def test_widths_that_cannot_be_grouped_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        group_size_for(100)
