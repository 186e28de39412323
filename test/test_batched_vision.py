"""Frames of several cameras through the vision encoder in one batch (VLMEngine.prepare_images):
the same features as one frame at a time, and the answers that follow are embedding-cache hits.
Real models on the CPU: tiny random LLaVA-1.5 and LLaVA-1.6, and the embedded demo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ros2_nanovlm.engine import EngineConfig, InvalidInput, VLMEngine
from ros2_nanovlm.engine.hf.composed import ComposedImageEncoder

QUESTION = "What is in the image?"


@pytest.fixture(params=["llava", "llava_next", "demo"])
def model_path(request, tiny_llava, tiny_llava_next):
    if request.param == "demo":
        return request.getfixturevalue("demo_model")  # built only when a demo case runs
    return {"llava": tiny_llava, "llava_next": tiny_llava_next}[request.param]


def load(model_path, **options) -> VLMEngine:
    return VLMEngine.load(EngineConfig(model_path=str(model_path), device="cpu", max_new_tokens=12, **options))


@pytest.fixture
def frames(photos):
    """Three different photos of three aspect ratios (LLaVA-1.6 tiles them differently)."""
    return [photos["dogs"], np.ascontiguousarray(photos["fruit"][:, :120]), photos["lake"][:200, :200].copy()]


def count_vision_calls(engine: VLMEngine) -> list:
    """A list that grows by one for each forward of the vision network (of the demo model's
    projector: its encoder runs forward_features, which forward hooks do not see)."""
    encoder = engine._backend.encode_image
    if isinstance(encoder, ComposedImageEncoder):
        network = encoder._projector
    else:
        network = engine._backend.model.model.vision_tower
    calls = []
    network.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_batch_gives_the_features_of_single_frames(model_path, frames):
    encoder = load(model_path)._backend.encode_image
    with torch.inference_mode():
        single = [encoder(frame) for frame in frames]
    batched = encoder.encode_batch(frames)
    assert len(batched) == len(frames)
    for ours, reference in zip(batched, single, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    if "next" in str(model_path):  # the split per frame is exercised: token counts differ
        assert len({len(features) for features in single}) > 1, [len(features) for features in single]


def test_prepared_frames_are_cache_hits_with_the_same_answers(model_path, frames):
    engine = load(model_path)
    calls = count_vision_calls(engine)
    assert engine.prepare_images(frames) == 3
    assert len(calls) == 1, "the frames did not go through the vision network in one batch"
    fresh = load(model_path)
    for frame in frames:
        answer = engine.ask(QUESTION, frame)
        assert answer.image_cache_hit
        assert answer.timings.vision_ms == 0.0
        expected = fresh.ask(QUESTION, frame)
        assert not expected.image_cache_hit
        assert answer.text == expected.text
    assert len(calls) == 1, "an answer ran the vision network again"

    # All cached: nothing to encode; repeats within a call count once.
    assert engine.prepare_images(frames) == 0
    new = np.ascontiguousarray(frames[0][::-1])
    assert engine.prepare_images([frames[1].copy(), new, new.copy()]) == 1
    assert len(calls) == 2


def test_a_batch_larger_than_the_cache_encodes_what_the_cache_holds(tiny_llava, frames):
    engine = load(tiny_llava, embedding_cache_size=2)
    assert engine.prepare_images(frames) == 2
    assert engine.ask(QUESTION, frames[0]).image_cache_hit, "the batch evicted its own first frame"
    assert engine.ask(QUESTION, frames[1]).image_cache_hit
    assert not engine.ask(QUESTION, frames[2]).image_cache_hit
    assert load(tiny_llava, embedding_cache_size=0).prepare_images(frames) == 0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32, 3), np.float32),  # wrong dtype
        np.zeros((32, 32, 4), np.uint8),  # RGBA
        np.zeros((32, 32), np.uint8),  # grey
        np.zeros((0, 32, 3), np.uint8),  # empty
        "not an image",
    ],
    ids=["float32", "rgba", "grey", "empty", "str"],
)
def test_an_invalid_frame_encodes_nothing(tiny_llava, frames, bad):
    engine = load(tiny_llava)
    calls = count_vision_calls(engine)
    with pytest.raises(InvalidInput):
        engine.ask(QUESTION, bad)  # what ask refuses, prepare_images refuses too
    with pytest.raises(InvalidInput):
        engine.prepare_images([frames[0], bad, frames[1]])
    assert not calls and len(engine._backend.embeddings) == 0


def test_frames_over_the_pixel_limit_or_not_a_list_are_refused(tiny_llava, frames):
    engine = load(tiny_llava, max_image_pixels=100 * 100)
    with pytest.raises(InvalidInput, match="over the limit"):
        engine.prepare_images([frames[0][:100, :100], frames[1]])
    with pytest.raises(InvalidInput, match="not one frame"):
        engine.prepare_images(frames[0])
    with pytest.raises(InvalidInput):
        engine.prepare_images(None)
    assert engine.prepare_images([]) == 0
    assert len(engine._backend.embeddings) == 0
