"""The GPU fast path beyond Llama, run on the CPU by Triton's interpreter (as
test_cuda_kernels.py): FastLlama against transformers' own Qwen2, Qwen3 and StableLM, and the
processor-driven families (Qwen2.5-VL with its 3-D positions, Qwen3-VL with its deepstack
features, SmolVLM2, InternVL) with their language model moved into FastLlama, against the
whole transformers model: the prompt's logits, then a decode step's (Qwen's rope offset).

On the GPU machine the same tests run the compiled kernels: NANOVLM_TEST_DEVICE=cuda."""

from __future__ import annotations

import copy
import os

DEVICE = os.environ.get("NANOVLM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from test_transformers_families import BUILDERS  # noqa: E402

from ros2_nanovlm.engine import families  # noqa: E402
from ros2_nanovlm.engine.api import Turn  # noqa: E402
from ros2_nanovlm.engine.cuda.fast_llama import FastLlama  # noqa: E402
from ros2_nanovlm.engine.cuda.processor_fast import FastProcessorRunner, move_language_model  # noqa: E402
from ros2_nanovlm.engine.cuda.support import unsupported_reason  # noqa: E402
from ros2_nanovlm.engine.hf.processor_runner import ProcessorPrompter  # noqa: E402

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip

LANGUAGE_MODELS = {
    "qwen2 (qkv bias)": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL)),
    "qwen3 (q and k norms)": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL, head_dim=32)),
    # Obsidian's StableLM: LayerNorm with bias, rotary over a quarter of heads of 80
    "stablelm (LayerNorm, partial rotary, head 80)": lambda: tf.StableLmForCausalLM(
        tf.StableLmConfig(**dict(SMALL, hidden_size=160, num_attention_heads=2, num_key_value_heads=2))
    ),
}


def relative_error(value, reference) -> float:
    value, reference = value.float().cpu(), reference.float().cpu()
    return float((value - reference).norm() / reference.norm())


def decode_step_body_after(lm: FastLlama, token: int, position: int) -> None:
    """What the captured decode step runs, eagerly: `token` at `position` -> lm._logits, lm._token."""
    lm._token.fill_(token)
    lm._position.fill_(position)
    lm._length.fill_(position + 1)
    lm._decode_step_body()


def with_visible_extras(model):
    """Random init leaves biases at 0 and norm weights at 1: perturb them so that a bias or norm
    weight the fast path dropped would show."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_fast_llama_equals_transformers_on_each_supported_family(name):
    torch.manual_seed(0)
    model = with_visible_extras(LANGUAGE_MODELS[name]())
    assert unsupported_reason(model.config) == ""
    ids = torch.randint(0, 512, (20,))
    with torch.inference_mode():
        reference = model(ids[None]).logits[0, -1]
        device = torch.device(DEVICE)
        lm = FastLlama.from_hf(model.model, model.lm_head, max_tokens=64, quantize=False, device=device)
        lm = FastLlama.from_state(model.config, lm.state_dict(), max_tokens=64, device=device)
        embeds = lm.embed(ids.to(device))
        whole = lm.prefill_logits(embeds, 0)
        assert relative_error(whole, reference) < 5e-3
        lm.prefill_logits(embeds[:12], 0)
        assert relative_error(lm.prefill_logits(embeds[12:], 12), whole) < 2e-3
        lm._allocate_decode_buffers()
        lm.prefill_logits(embeds[:19], 0)
        decode_step_body_after(lm, int(ids[19]), 19)
        assert relative_error(lm._logits, whole) < 2e-3


def test_what_the_fast_path_cannot_run_is_named():
    stablelm = tf.StableLmConfig(**SMALL, use_parallel_residual=True)
    assert "parallel residual" in unsupported_reason(stablelm)
    assert "model_type 'gemma3_text'" in unsupported_reason({"model_type": "gemma3_text"})
    assert "sliding-window" in unsupported_reason(tf.Qwen2Config(**SMALL, use_sliding_window=True))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "smolvlm", "internvl"])
def test_processor_family_on_fast_llama_equals_the_whole_model(family):
    """The model's own forward prepares the language model's inputs (images merged, Qwen's 3-D
    positions, Qwen3-VL's deepstack features); FastLlama's prompt logits and next decode step
    equal transformers' (float32) for the same prompt."""
    torch.manual_seed(0)
    model, processor, _, _ = BUILDERS[family]()
    model = with_visible_extras(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    frame = (np.random.default_rng(0).random((213, 320, 3)) * 255).astype(np.uint8)
    prompter = ProcessorPrompter(processor, getattr(families, family), torch.device(DEVICE), torch.float16)
    prompt = prompter.inputs("Be brief.", (Turn("user", "What is in the image?", frame),))
    with torch.inference_mode():
        reference_model = copy.deepcopy(model).float()
        tensors = {key: value.cpu().float() if value.is_floating_point() else value.cpu()
                   for key, value in prompt.tensors.items()}  # fmt: skip
        output = reference_model(**tensors, use_cache=True)
        token = int(output.logits[0, -1].argmax())
        following = reference_model(
            input_ids=torch.tensor([[token]]), past_key_values=output.past_key_values, use_cache=True
        ).logits[0, -1]

        lm = move_language_model(model, torch.device(DEVICE), quantize=False, max_tokens=256)
        runner = FastProcessorRunner(model, lm)
        lm._allocate_decode_buffers()
        assert runner.prefill(prompt, 0) == token
        assert relative_error(lm.prefill_logits(*_prompt_arguments(runner, prompt)), output.logits[0, -1]) < 5e-3
        decode_step_body_after(lm, token, prompt.length)
        assert relative_error(lm._logits, following) < 5e-3
        assert int(lm._token) == int(following.argmax())


def _prompt_arguments(runner, prompt):
    from ros2_nanovlm.engine.cuda.processor_fast import deepstack_additions

    inputs = runner.language_inputs(prompt)
    return inputs.embeds, 0, inputs.positions, deepstack_additions(inputs)
