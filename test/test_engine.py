"""The engine on tiny random LLaVA models (CPU, float32): KV reuse, caches, errors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ros2_nanovlm.engine import EngineConfig, InvalidInput, ModelLoadError, Turn, VLMEngine

ENGINE_DIR = Path(__file__).resolve().parent.parent / "ros2_nanovlm" / "engine"


@pytest.fixture(params=["llava", "llava_next", "llava_stablelm"])
def engine(request, tiny_llava, tiny_llava_next, tiny_llava_stablelm):
    path = {"llava": tiny_llava, "llava_next": tiny_llava_next, "llava_stablelm": tiny_llava_stablelm}[request.param]
    return VLMEngine.load(EngineConfig(model_path=str(path), device="cpu", max_new_tokens=12))


def count_vision_calls(engine) -> list:
    calls = []
    engine._backend.model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_first_turn_matches_transformers_generate(engine, photos):
    """Our prompt assembly, image splicing and KV cache give the tokens transformers' own
    processor + generate() give for the same conversation."""
    frame = photos["dogs"]
    ours = engine.ask("What breeds of dogs are in the image?", frame, system_prompt="Be brief.")
    backend = engine._backend
    question = Turn("user", "What breeds of dogs are in the image?", frame)
    rendered = backend.prompter.render("Be brief.", (question,))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(engine.config.model_path)
    inputs = processor(text=rendered, images=frame, return_tensors="pt")
    with torch.inference_mode():
        reference = backend.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reference_tokens = reference[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.prompt_tokens == inputs["input_ids"].shape[1]
    assert ours.token_ids == [t for t in reference_tokens if t not in backend.eos_ids][: len(ours.token_ids)]


def test_follow_up_reuses_kv_cache_and_equals_fresh_prefill(engine, photos, tiny_llava):
    chat = engine.chat("You are a robot's eyes.")
    first = chat.ask("What is in the image?", photos["fruit"])
    second = chat.ask("How much do the peaches cost?")
    # The follow-up prefilled only what is new: at least the whole first prompt was reused.
    assert second.reused_tokens >= first.prompt_tokens
    assert second.prompt_tokens - second.reused_tokens < second.prompt_tokens - first.prompt_tokens + 8

    # A fresh engine prefilling the whole conversation at once generates the same tokens.
    fresh = VLMEngine.load(engine.config)
    replay = fresh._answer(chat.system_prompt, chat.history[:-1], None, None)
    assert replay.reused_tokens == 0
    assert replay.prompt_tokens == second.prompt_tokens
    assert replay.token_ids == second.token_ids


def test_repeated_image_hits_the_embedding_cache(engine, photos):
    calls = count_vision_calls(engine)
    first = engine.ask("What is in the image?", photos["lake"])
    assert not first.image_cache_hit and len(calls) == 1
    again = engine.ask("Are there any hazards?", photos["lake"].copy())  # same pixels, new array
    assert again.image_cache_hit
    assert again.timings.vision_ms == 0.0
    assert len(calls) == 1, "the vision encoder ran again for an image it had seen"
    other = engine.ask("What is in the image?", photos["path"])
    assert not other.image_cache_hit and len(calls) == 2


def test_reset_clears_the_history(engine, photos):
    chat = engine.chat()
    single = chat.ask("What is in the image?", photos["soccer"])
    chat.ask("What colour is the ball?")
    assert len(chat.history) == 4
    chat.reset()
    assert chat.history == ()
    after_reset = chat.ask("What is in the image?", photos["soccer"])
    assert after_reset.prompt_tokens == single.prompt_tokens
    assert after_reset.token_ids == single.token_ids


def test_stream_of_frames_reuses_the_shared_prefix(engine, photos):
    system = "You are the eyes of a delivery robot. Answer in one short sentence."
    engine.ask("Describe the scene.", photos["dogs"], system_prompt=system)
    answer = engine.ask("Describe the scene.", photos["boxes"], system_prompt=system)
    # Everything before the new image (system prompt, template) came from the KV cache.
    assert answer.reused_tokens > len(system)


@pytest.mark.parametrize(
    "prompt, frame, message",
    [
        ("", None, "prompt is empty"),
        ("   ", None, "prompt is empty"),
        ("x" * 5000, None, "prompt is 5000 tokens, over max_prompt_tokens=1024"),
        ("x" * 40000, None, "40000 characters, far over max_prompt_tokens=1024"),
        ("ok", np.zeros((8, 8, 3), np.float32), "RGB uint8"),
        ("ok", np.zeros((8, 8), np.uint8), "RGB uint8"),
        ("ok", np.zeros((0, 8, 3), np.uint8), "empty"),
        ("ok", np.zeros((5000, 4000, 3), np.uint8), "over the limit"),
        ("ok", "not an image", "numpy array"),
    ],
)
def test_bad_requests_raise_clear_errors_and_engine_keeps_working(tiny_llava, photos, prompt, frame, message):
    engine = VLMEngine.load(EngineConfig(model_path=str(tiny_llava), max_new_tokens=4, max_image_pixels=10_000_000))
    with pytest.raises(InvalidInput, match=message):
        engine.ask(prompt, frame)
    assert engine.ask("What is in the image?", photos["dogs"]).generated_tokens > 0


def test_prompt_longer_than_the_context_is_refused(tiny_llava, photos):
    engine = VLMEngine.load(EngineConfig(model_path=str(tiny_llava), max_context_tokens=64, max_new_tokens=4))
    with pytest.raises(InvalidInput, match="over the context"):
        engine.ask("describe " * 10, photos["dogs"])
    near_full = engine.ask("Hi?", photos["dogs"], max_new_tokens=200)
    assert near_full.stop_reason in ("context_full", "eos")
    assert near_full.prompt_tokens + near_full.generated_tokens <= 64


def test_model_path_errors_name_the_path(tmp_path):
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "file.bin"): "is not a directory",
        str(tmp_path / "empty"): "has no config.json",
        str(tmp_path / "bert"): "holds a 'bert' model",
    }
    (tmp_path / "file.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    for path, reason in cases.items():
        with pytest.raises(ModelLoadError) as error:
            VLMEngine.load(EngineConfig(model_path=path))
        assert path in str(error.value) and reason in str(error.value)


def test_invalid_config_values_are_refused():
    for field, value in [("device", "tpu"), ("dtype", "int3"), ("max_new_tokens", 0), ("backend", "mlc")]:
        config = EngineConfig(model_path="/nowhere", **{field: value})
        with pytest.raises(ValueError, match=field.split("_")[0]):
            config.validate()


def test_json_mode_returns_an_object_even_from_a_random_model(tiny_llava, photos):
    engine = VLMEngine.load(EngineConfig(model_path=str(tiny_llava), max_new_tokens=4))
    answer = engine.ask("List the objects.", photos["boxes"], json_output=True)
    # The grammar forces a closing path before the 4-token budget runs out: a random model's
    # answer is still one JSON object, and nothing is reported as an error.
    assert isinstance(json.loads(answer.json), dict)
    assert answer.json_error == ""
    assert answer.text == answer.json


def test_fast_path_runs_llama_and_stablelm_and_says_why_not_for_others(tiny_llava, tiny_llava_stablelm):
    """The GPU fast path's gate accepts the Llama of LLaVA-1.5 and the StableLM of Obsidian-3B,
    and refuses what it cannot run with a reason."""
    from ros2_nanovlm.engine.cuda.support import unsupported_reason

    def text_config(path):
        return json.loads((path / "config.json").read_text())["text_config"]

    assert unsupported_reason(text_config(tiny_llava)) == ""
    assert unsupported_reason(text_config(tiny_llava_stablelm)) == ""
    assert "gemma3_text" in unsupported_reason(dict(text_config(tiny_llava), model_type="gemma3_text"))
    assert "parallel residual" in unsupported_reason(dict(text_config(tiny_llava_stablelm), use_parallel_residual=True))


def test_engine_imports_nothing_from_ros():
    for path in ENGINE_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"rclpy", "sensor_msgs", "std_msgs", "nanovlm", "cv_bridge"}, (
                    f"{path.relative_to(ENGINE_DIR.parent)} imports {name}"
                )
