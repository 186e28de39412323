"""Tiny LLaVA-architecture models with random weights, built locally from configs.

No pretrained VLM can be downloaded on the machines this project is developed on, so tests and
the first-run demo use these: the real transformers LLaVA code path (CLIP vision tower, projector,
Llama), a byte-level tokenizer and LLaVA-1.5's chat template, with weights drawn from a fixed
seed. Their answers are noise by construction.

    python -m ros2_nanovlm.engine.tiny /tmp/tiny-llava [--llava-next]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format (USER: <image>\n... ASSISTANT:), with a system line.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'USER: ' }}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ ' ' }}"
    "{% else %}"
    "{{ 'ASSISTANT: ' }}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 0):
    """A tokenizer with one token per byte plus LLaVA's special tokens; needs no training data.
    `vocab_size` pads the vocabulary with <extra_N> tokens (real-size benchmark models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
    )


TEXT_MODELS = ("llama", "stablelm")


def build_tiny_llava(
    output_dir: str | Path, *, llava_next: bool = False, text_model: str = "llama", seed: int = 0
) -> Path:
    """Write a tiny random LLaVA (or LLaVA-NeXT) model with its processor to `output_dir`.
    text_model "stablelm": a StableLM language model (LayerNorm, partial rotary), the
    Obsidian-3B layout, which the GPU fast path does not run (transformers does)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        StableLmConfig,
    )

    output_dir = Path(output_dir)
    tokenizer = byte_level_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    image_size, patch_size = 32, 8  # 4 x 4 = 16 image tokens per 32 px tile
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    if text_model not in TEXT_MODELS:
        raise ValueError(f"text_model must be one of {TEXT_MODELS}, not {text_model!r}")
    text_config_class = LlamaConfig if text_model == "llama" else StableLmConfig
    text = text_config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor_kwargs = dict(size={"shortest_edge": image_size}, crop_size=image_size)
    if llava_next:
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        )
        model_class, processor_class = LlavaNextForConditionalGeneration, LlavaNextProcessor
        image_processor = LlavaNextImageProcessorPil(
            **processor_kwargs, image_grid_pinpoints=config.image_grid_pinpoints
        )
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
        model_class, processor_class = LlavaForConditionalGeneration, LlavaProcessor
        image_processor = CLIPImageProcessorPil(**processor_kwargs)

    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random weights of std 0.02 make nearly flat logits; scale the output layer so that greedy
    # decoding has clear winners (less sensitive to float rounding, more like a trained model).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, as in the llava-hf checkpoints
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(output_dir)
    (output_dir / "NANOVLM_README.txt").write_text(
        "Tiny LLaVA-architecture model with RANDOM weights, built by ros2_nanovlm.engine.tiny.\n"
        "For tests and the first-run demo only: its answers are noise.\n"
    )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--llava-next", action="store_true", help="LLaVA-1.6 (any-resolution) layout")
    parser.add_argument("--text-model", choices=TEXT_MODELS, default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_llava(args.output_dir, llava_next=args.llava_next, text_model=args.text_model, seed=args.seed)
    print(json.dumps({"model": str(path)}))


if __name__ == "__main__":
    main()
