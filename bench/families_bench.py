"""The model families' GPU benchmark: ours (4-bit language model on FastLlama) against plain
transformers fp16, same run, random weights of the real shapes (issue 11's rows).

    python bench/families_bench.py [--archs vila1.5-3b,obsidian-3b,qwen2.5-vl-3b,smolvlm2-2.2b]

  vila1.5-3b     SigLIP-so400m-384 (27 x 27 patches) -> 2 x 2 downsample projector (196 tokens) ->
                 a 2.7B Llama (Sheared-LLaMA-2.7B's shape), through engine/families/vila.py's model class
  obsidian-3b    CLIP ViT-L/14-336 (576 tokens) -> mlp2x_gelu -> StableLM-3B-4E1T (LayerNorm,
                 rotary on 20 of 80 dimensions)
  qwen2.5-vl-3b  Qwen2.5-VL-3B-Instruct: its ViT (32 layers, window attention) at the processor's
                 default resolution (a 640 x 480 frame: 644 x 476 px, 391 tokens) -> Qwen2.5-3B
                 (GQA 16/2, qkv bias, 3-D rotary positions)
  smolvlm2-2.2b  SmolVLM2-2.2B-Instruct: SigLIP-so400m (384 px tiles; the frame is resized to
                 a longest edge of 1536 and split into 4 x 3 tiles plus a global view, 81 tokens
                 each) -> SmolLM2-1.7B (Llama)

Per architecture and mode, batch 1:
  answer_1tok_ms  a yes/no question about a NEW 640x480 frame: frame -> answer string, 1 token
  decode_tok_s    128 new tokens (EOS ignored), prefill excluded
  prompt_tokens, peak_gpu_gb (max_memory_reserved), and ours' answer breakdown
Medians after warm-up; bench/results/families-<device>.json and .md, ratios ours / baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

from engine_bench import device_peak_bandwidth, frames, median_ms  # noqa: E402

from ros2_nanovlm.engine import EngineConfig, VLMEngine  # noqa: E402
from ros2_nanovlm.engine.families import obsidian, qwen2_5_vl, smolvlm, vila  # noqa: E402
from ros2_nanovlm.engine.hf.backend import TransformersBackend  # noqa: E402
from ros2_nanovlm.engine.hf.processor_runner import ProcessorBackend  # noqa: E402
from ros2_nanovlm.engine.hf.vision import image_features  # noqa: E402
from ros2_nanovlm.engine.tiny import IMAGE_TOKEN, byte_level_tokenizer  # noqa: E402

QUESTION = "Is the path clear? Yes or no."
RESULTS = Path(__file__).resolve().parent / "results"
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)  # fmt: skip
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip


# ---- the architectures (random weights, fp16, on the GPU) ------------------------------------


def _on_gpu(model_class, config):
    torch.manual_seed(0)
    with torch.device("cuda"):
        return model_class._from_config(config, dtype=torch.float16).eval()


def _llava_processor(image_processor, chat_template):
    tokenizer = byte_level_tokenizer(vocab_size=32000)
    tokenizer.chat_template = chat_template
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                  vision_feature_select_strategy="default", chat_template=chat_template,
                                  image_token=IMAGE_TOKEN)  # fmt: skip
    return processor, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_vila15_3b():
    processor, image_token = _llava_processor(
        tf.SiglipImageProcessorPil(size={"height": 384, "width": 384}), vila.CHAT_TEMPLATE
    )
    text = tf.LlamaConfig(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
                          num_key_value_heads=20, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    config = tf.LlavaConfig(vision_config=tf.SiglipVisionConfig(**SIGLIP_SO400M_384), text_config=text,
                            image_token_id=image_token, vision_feature_layer=-2,
                            vision_feature_select_strategy="full", projector_hidden_act="gelu")  # fmt: skip
    return "llava", _on_gpu(vila.VilaForConditionalGeneration, config), processor, None


def build_obsidian_3b():
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336)
    processor, image_token = _llava_processor(image_processor, obsidian.CHAT_TEMPLATE)
    text = tf.StableLmConfig(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=50304, partial_rotary_factor=0.25,
                             layer_norm_eps=1e-5, max_position_embeddings=4096)  # fmt: skip
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**CLIP_L_336), text_config=text,
                            image_token_id=image_token, projector_hidden_act="gelu")  # fmt: skip
    return "llava", _on_gpu(tf.LlavaForConditionalGeneration, config), processor, None


def build_qwen25_vl_3b():
    from test_transformers_families import QWEN_SPECIALS, family_tokenizer, ids_of

    from ros2_nanovlm.engine.families import native

    tokenizer = family_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    processor = native.images_only(tf.Qwen2_5_VLProcessor)(
        image_processor=tf.Qwen2VLImageProcessorPil(),  # the published defaults: 14 px patches, merge 2
        tokenizer=tokenizer,
        video_processor=native.NoVideos(),
        chat_template=qwen2_5_vl.CHAT_TEMPLATE,
    )
    image, video, start, end = ids_of(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    config = tf.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=True,
    )  # fmt: skip
    return "processor", _on_gpu(tf.Qwen2_5_VLForConditionalGeneration, config), processor, qwen2_5_vl


def build_smolvlm2_2b():
    from test_transformers_families import ids_of, smolvlm_tokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from ros2_nanovlm.engine.families import native

    smolvlm._without_num2words()
    tokenizer = smolvlm_tokenizer(tiles_per_side=6)
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}, do_image_splitting=True
    )
    processor = native.images_only(tf.SmolVLMProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=native.NoVideos(), image_seq_len=81,
        chat_template=smolvlm.CHAT_TEMPLATE,
    )  # fmt: skip
    (image,) = ids_of(tokenizer, "<image>")
    config = tf.SmolVLMConfig(
        vision_config=dict(SIGLIP_SO400M_384, image_size=384),
        text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49280,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 130000.0}),
        scale_factor=3, image_token_id=image,
    )  # fmt: skip
    return "processor", _on_gpu(tf.SmolVLMForConditionalGeneration, config), processor, smolvlm


ARCHS = {
    "vila1.5-3b": build_vila15_3b,
    "obsidian-3b": build_obsidian_3b,
    "qwen2.5-vl-3b": build_qwen25_vl_3b,
    "smolvlm2-2.2b": build_smolvlm2_2b,
}


# ---- baseline: plain transformers fp16 ----------------------------------------------------------


def _pil(frame):
    from PIL import Image

    return Image.fromarray(frame)


def bench_baseline(kind: str, model, processor, repeats: int) -> dict:
    """model.generate on the processor's inputs (LLaVA kinds: the prompt's image token repeated
    once per image feature, as LLaVA's generate expects)."""
    pool = iter(frames(1000, seed=1))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs_for(frame):
        if kind == "processor":
            batch = processor(text=text, images=[_pil(frame)], return_tensors="pt").to("cuda")
            return {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}
        pixels = processor.image_processor(images=frame, return_tensors="pt")["pixel_values"].to("cuda", torch.float16)
        image_token = model.config.image_token_id
        count = image_features(model, pixels, vision_feature_layer=model.config.vision_feature_layer,
                               vision_feature_select_strategy=model.config.vision_feature_select_strategy).shape[0]  # fmt: skip
        ids = []
        for token in processor.tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids += [token] * count if token == image_token else [token]
        ids = torch.tensor([ids], device="cuda")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def generate(new_tokens, frame=None):
        batch = inputs_for(next(pool) if frame is None else frame)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    fixed = next(pool)
    prompt_tokens = inputs_for(fixed)["input_ids"].shape[1]
    one = median_ms(lambda: generate(1, fixed), repeats)
    many = median_ms(lambda: generate(129, fixed), max(3, repeats // 3), warmup=1)
    result = {
        "prompt_tokens": prompt_tokens,
        "decode_tok_s": 128 / ((many - one) / 1000),
        "answer_1tok_ms": median_ms(lambda: generate(1), repeats),
    }
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    generate(3)
    result["peak_gpu_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return result


# ---- ours -----------------------------------------------------------------------------------


def bench_ours(kind: str, model, processor, family, context: int, repeats: int) -> dict:
    config = EngineConfig(model_path="(random weights)", device="cuda", quantization="int4",
                          max_context_tokens=context, embedding_cache_size=4)  # fmt: skip
    started = time.perf_counter()
    if kind == "llava":
        backend = TransformersBackend.from_model(model, processor, config, name="random-int4")
    else:
        model.to("cpu")  # as a checkpoint arrives: FastLlama quantizes it layer by layer on the GPU
        torch.cuda.empty_cache()
        backend = ProcessorBackend.from_model(model, processor, family, config, name="random-int4")
    load_s = time.perf_counter() - started
    del model
    gc.collect()
    torch.cuda.empty_cache()
    backend.eos_ids = set()  # random weights: force the number of tokens
    engine = VLMEngine(backend, config)
    pool = iter(frames(1000, seed=2))

    def ask(new_tokens):
        return engine.ask(QUESTION, next(pool), max_new_tokens=new_tokens)

    first = ask(1)
    decode = [ask(129) for _ in range(max(3, repeats // 3))]
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    answers = [ask(1) for _ in range(repeats + 2)][2:]
    lm = backend.lm.lm if kind == "processor" else backend.lm
    result = {
        "prompt_tokens": first.prompt_tokens,
        "decode_tok_s": statistics.median(128 / (a.timings.decode_ms / 1000) for a in decode),
        "answer_1tok_ms": statistics.median(a.timings.total_ms for a in answers),
        "answer_1tok_breakdown_ms": {
            "vision": statistics.median(a.timings.vision_ms for a in answers),
            "prefill": statistics.median(a.timings.prefill_ms for a in answers),
        },
        "peak_gpu_gb": torch.cuda.max_memory_reserved() / 1e9,
        "weight_bytes_per_token": lm.weight_bytes_per_token(),
        "load_and_capture_s": load_s,
        "quantization": backend.quantization,
    }
    if kind == "llava":
        result["prefill_graphs"] = {"replays": lm._prefill_graphs.replays,
                                    "disabled": lm._prefill_graphs.disabled_reason}  # fmt: skip
    engine.close()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048, help="KV cache of ours (SmolVLM2's frame: ~1100 tokens)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    device_name, bandwidth = device_peak_bandwidth()
    results = {
        "device": device_name,
        "peak_bandwidth_bytes_s": bandwidth,
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "context_tokens": args.context,
        "question": QUESTION,
        "archs": {},
    }
    for name in args.archs.split(","):
        print(f"== {name}", flush=True)
        modes = {}
        for label in ("baseline_transformers_fp16", "ours_int4"):
            try:
                kind, model, processor, family = ARCHS[name]()
                if label.startswith("baseline"):
                    modes[label] = bench_baseline(kind, model, processor, args.repeats)
                else:
                    modes[label] = bench_ours(kind, model, processor, family, args.context, args.repeats)
            except Exception as error:  # noqa: BLE001 - keep the other figures
                traceback.print_exc()
                modes[label] = {"error": repr(error)[:500]}
            model = None
            gc.collect()
            torch.cuda.empty_cache()
            print(label, modes[label], flush=True)
        ours, baseline = modes.get("ours_int4", {}), modes.get("baseline_transformers_fp16", {})
        if "decode_tok_s" in ours:
            ours["bandwidth_fraction"] = ours["weight_bytes_per_token"] * ours["decode_tok_s"] / bandwidth
        if "decode_tok_s" in ours and "decode_tok_s" in baseline:
            modes["speedup_ours_int4_over_baseline"] = {
                "decode_tok_s": ours["decode_tok_s"] / baseline["decode_tok_s"],
                "answer_1tok_ms": baseline["answer_1tok_ms"] / ours["answer_1tok_ms"],
            }
        results["archs"][name] = modes
        write_results(results, Path(args.out_dir))


def write_results(results: dict, out_dir: Path) -> None:
    tag = results["device"].split()[1] if len(results["device"].split()) > 1 else results["device"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"families-{tag}.json").write_text(json.dumps(results, indent=2))
    keys = ("prompt_tokens", "answer_1tok_ms", "decode_tok_s", "peak_gpu_gb", "bandwidth_fraction")
    lines = [f"# Model families on {results['device']}", "",
             f"torch {results['torch']}, transformers {results['transformers']}; batch 1, random weights of the "
             f"real shapes, a new 640x480 frame per answer; ours: 4-bit language model, KV cache "
             f"{results['context_tokens']} tokens.", "",
             "| arch | mode | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for arch, modes in results["archs"].items():
        for mode, values in modes.items():
            suffix = "x" if mode.startswith("speedup") else ""
            row = [f"{values[k]:.3g}{suffix}" if isinstance(values.get(k), (int, float)) else "" for k in keys]
            lines.append(f"| {arch} | {mode} | " + " | ".join(row) + " |")
    (out_dir / f"families-{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/families-{tag}.json", flush=True)


if __name__ == "__main__":
    main()
