"""Real-size LLaVA architectures with random weights, built on the GPU in seconds.

Speed does not depend on weight values; only the shapes must be real. The tokenizer is the
tiny models' byte-level one padded to a 32000-token vocabulary, with LLaVA-1.5's template.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ros2_nanovlm.engine.tiny import CHAT_TEMPLATE, IMAGE_TOKEN, byte_level_tokenizer

CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)  # fmt: skip

# name -> Llama text config (LLaVA-1.5-7B and -13B; a 2.7B Llama like VILA-2.7B / Sheared-LLaMA-2.7B).
# engine_bench.py runs 7b and 2.7b by default; --archs llava-1.5-13b adds the 13B (26 GB in fp16).
TEXT_CONFIGS = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                          num_key_value_heads=40, vocab_size=32064),
    "llava-2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
                       num_key_value_heads=20, vocab_size=32000),
}  # fmt: skip


def build(name: str, seed: int = 0):
    """(LlavaForConditionalGeneration in fp16 on the GPU with random weights, processor)."""
    from transformers import CLIPImageProcessorPil

    tokenizer = byte_level_tokenizer(vocab_size=32000)
    text = LlamaConfig(**TEXT_CONFIGS[name], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float16).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    return model, processor
