"""Train the demo VLM's projector: EfficientNet-Lite0 features -> SmolLM2-135M-Instruct.

Teaches the frozen LM to answer "What is in the image?" with what the frozen encoder's own
ImageNet head sees ("A golden retriever."). Only the projector trains. Steps:

  1. Fetch the training photos: image files that ship inside pinned PyPI wheels (scikit-image,
     scikit-learn, matplotlib), read straight from the wheel zips with `pip download --no-deps`
     (nothing is installed). Licences: see ros2_nanovlm/engine/demo_model/SOURCES.md.
  2. Widen them with heavy augmentation (random resized crops, flips, rotations, colour jitter,
     grey, blur, 2x2 mosaics, blends), run the frozen encoder once per augmented frame and
     pseudo-label it with the head's top-1 class. Frequent classes are capped so that many
     different class names are seen. A seeded 10% of the classes is held out for validation.
  3. Train the projector with the LM frozen, loss on the answer tokens only, bf16 autocast on
     the CPU, the constant prompt prefix (system turn) run once as a KV cache.
  4. Check greedy answers on the held-out classes, write projector.json + projector.safetensors.

The data/images photos are the test set of check_demo_vlm.py and are never used here.

    python training/train_projector.py [--out-dir DIR] [--steps 250] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import time
import zipfile

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_demo_vlm as vlm
from check_demo_vlm import efficientnet_lite, projector_lib

# Training photos inside PyPI wheels: {wheel: [(file in the wheel, sha256 prefix, licence)]}.
# The wheels are only downloaded and read as zip files, never installed.
PHOTO_WHEELS = {
    "scikit-image==0.26.0": [
        ("skimage/data/astronaut.png", "88431cd9653ccd53", "public domain (NASA)"),
        ("skimage/data/camera.png", "b0793d2adda0fa6a", "CC0 (Lav Varshney)"),
        ("skimage/data/chelsea.png", "596aa1e7cb875eb7", "CC0 (Stefan van der Walt)"),
        ("skimage/data/coffee.png", "cc02f8ca188b167c", "CC0 (Rachel Michetti)"),
        ("skimage/data/coins.png", "f8d773fc9cfa6f4d", "no known copyright restrictions (Brooklyn Museum)"),
        ("skimage/data/rocket.jpg", "c2dd0de7c538df8d", "public domain (SpaceX)"),
        ("skimage/data/hubble_deep_field.jpg", "3a19c5dd8a927a93", "public domain (NASA)"),
        ("skimage/data/retina.jpg", "38a07f36f27f095e", "CC0 (Mikael Haggstrom)"),
        ("skimage/data/ihc.png", "f8dd1aa387ddd1f4", "no known copyright restrictions (CMMI)"),
        ("skimage/data/brick.png", "7966caf324f6ba84", "CC0 (CC0Textures)"),
        ("skimage/data/grass.png", "b6b6022426b38936", "CC0 (linolafett)"),
        ("skimage/data/gravel.png", "c48615b451bf1e60", "CC0 (CC0Textures)"),
        ("skimage/data/horse.png", "c7fb60789fe394c4", "CC0 (openclipart, Andreas Preuss)"),
        ("skimage/data/text.png", "bd84aa3a6e3c9887", "public domain (Wikipedia)"),
    ],
    "scikit-learn==1.9.1": [
        ("sklearn/datasets/images/china.jpg", "8378025ad2519d64", "CC BY 2.0 (danielbuechele, Flickr)"),
        ("sklearn/datasets/images/flower.jpg", "a77f6ec41e353afd", "CC BY 2.0 (vultilion, Flickr)"),
    ],
    "matplotlib==3.11.2": [
        ("matplotlib/mpl-data/sample_data/grace_hopper.jpg", "a8ca6d734765703b", "public domain (US Navy)"),
    ],
}

QUESTIONS = [
    "What is in the image?",
    "What do you see?",
    "Describe the image.",
    "What is this?",
    "What does the camera see?",
    "What is shown here?",
]


# ----------------------------------------------------------------------------- 1. photos
def fetch_wheel(requirement: str, cache_dir: str) -> str:
    """Path of the wheel for `requirement` in cache_dir, downloaded with pip if missing."""
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]

    def find() -> str | None:
        for f in sorted(os.listdir(cache_dir)):
            if f.startswith(f"{name}-{version}-") and f.endswith(".whl"):
                return os.path.join(cache_dir, f)
        return None

    os.makedirs(cache_dir, exist_ok=True)
    if find() is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "-d",
                cache_dir,
                requirement,
            ],
            check=True,
        )
    return find()


def load_training_photos(cache_dir: str) -> dict[str, np.ndarray]:
    """{file name: RGB uint8 image}; grey images become 3 equal channels."""
    photos = {}
    for requirement, members in PHOTO_WHEELS.items():
        with zipfile.ZipFile(fetch_wheel(requirement, cache_dir)) as wheel:
            for member, sha256_prefix, _licence in members:
                raw = wheel.read(member)
                if hashlib.sha256(raw).hexdigest()[:16] != sha256_prefix:
                    raise RuntimeError(f"{member} in {requirement} is not the expected file")
                data = np.frombuffer(raw, np.uint8)
                bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)  # also expands grey/bool PNGs to 3 channels
                photos[os.path.basename(member)] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return photos


# ----------------------------------------------------------------------------- 2. augmentation
def random_resized_crop(rng: random.Random, image: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Crop of 8-100% of the area, aspect ratio 3:4..4:3, resized to out_w x out_h."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 8 <= cw <= w and 8 <= ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return cv2.resize(image[y0 : y0 + ch, x0 : x0 + cw], (out_w, out_h), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)


def colour_jitter(rng: random.Random, image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32)
    x = x * rng.uniform(0.6, 1.4)  # brightness
    x = (x - x.mean()) * rng.uniform(0.6, 1.4) + x.mean()  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(0.5, 1.5) + grey  # saturation
    if rng.random() < 0.1:
        x = np.repeat(grey, 3, axis=2)  # greyscale
    return np.clip(x, 0, 255).astype(np.uint8)


def rotate(rng: random.Random, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-30, 30), rng.uniform(1.0, 1.3))
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT_101)


def augmented_frame(rng: random.Random, photos: list[np.ndarray]) -> np.ndarray:
    """One random camera-like RGB frame (224..480 px, any aspect) made from the photos."""
    out_w, out_h = rng.randint(224, 480), rng.randint(224, 400)
    kind = rng.random()
    if kind < 0.2:  # 2x2 mosaic of four crops: new object mixes, new head outputs
        tiles = [random_resized_crop(rng, rng.choice(photos), out_w // 2, out_h // 2) for _ in range(4)]
        frame = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
    elif kind < 0.3:  # blend of two crops
        a, b = (random_resized_crop(rng, rng.choice(photos), out_w, out_h) for _ in range(2))
        alpha = rng.uniform(0.3, 0.7)
        frame = cv2.addWeighted(a, alpha, b, 1.0 - alpha, 0)
    else:
        frame = random_resized_crop(rng, rng.choice(photos), out_w, out_h)
    if rng.random() < 0.5:
        frame = frame[:, ::-1]
    if rng.random() < 0.3:
        frame = rotate(rng, np.ascontiguousarray(frame))
    frame = colour_jitter(rng, frame)
    if rng.random() < 0.15:
        frame = cv2.GaussianBlur(frame, (0, 0), rng.uniform(0.5, 2.0))
    return np.ascontiguousarray(frame)


@torch.inference_mode()
def encode_frames(encoder, projector, frames: list[np.ndarray]):
    """Frames -> (features (N,1280,7,7) fp32, top-1 class (N,), top-1 probability (N,))."""
    x = torch.cat([efficientnet_lite.preprocess_rgb(f) for f in frames])
    features = encoder.forward_features(x)
    # Label with the projector's stored copy of the head (fp16-rounded): exactly the class whose
    # name the projector will show the LM at run time.
    probs = projector.class_logits(features).softmax(-1)
    top_p, top_class = probs.max(-1)
    return features, top_class, top_p


def build_dataset(encoder, projector, photos, num_frames: int, max_per_class: int, seed: int):
    rng = random.Random(seed)
    photo_list = [photos[k] for k in sorted(photos)]
    features, classes, counts = [], [], {}
    skipped_low, skipped_cap = 0, 0
    for start in range(0, num_frames, 32):
        frames = [augmented_frame(rng, photo_list) for _ in range(min(32, num_frames - start))]
        f, c, p = encode_frames(encoder, projector, frames)
        for i in range(len(frames)):
            cls = int(c[i])
            if p[i] < 0.10:  # the head itself is unsure: a noisy pseudo-label
                skipped_low += 1
            elif counts.get(cls, 0) >= max_per_class:
                skipped_cap += 1
            else:
                counts[cls] = counts.get(cls, 0) + 1
                features.append(f[i])
                classes.append(cls)
    print(
        f"frames {num_frames}: kept {len(classes)} in {len(counts)} classes, skipped "
        f"{skipped_low} with top-1 p < 0.10 and {skipped_cap} over the per-class cap {max_per_class}"
    )
    return torch.stack(features), torch.tensor(classes)


# ----------------------------------------------------------------------------- 3. LM side
def answer_text(class_name: str) -> str:
    """ "golden retriever" -> "A golden retriever." (a/an by the first letter)."""
    article = "An" if class_name[0].lower() in "aeiou" else "A"
    return f"{article} {class_name}."


def fill_name_tables(projector, tok, lm, class_names: list[str]) -> None:
    """Store per class the LM token embeddings of " <short name>" (as it follows "A" in the answer)."""
    slots = projector.config.name_slots
    token_ids = [
        tok(" " + efficientnet_lite.short_class_name(n), add_special_tokens=False).input_ids[:slots]
        for n in class_names
    ]
    vocab = sorted({t for ids in token_ids for t in ids})
    row = {t: i for i, t in enumerate(vocab)}
    index = torch.full((len(class_names), slots), -1, dtype=torch.long)
    for c, ids in enumerate(token_ids):
        index[c, : len(ids)] = torch.tensor([row[t] for t in ids])
    table = lm.get_input_embeddings().weight[vocab].detach()
    projector.config.name_vocab = len(vocab)
    projector.name_token_embeds = table.half().float()  # fp16-rounded: as stored on disk
    projector.name_token_index = index
    truncated = sum(
        len(tok(" " + efficientnet_lite.short_class_name(n), add_special_tokens=False).input_ids) > slots
        for n in class_names
    )
    print(f"name tables: {len(vocab)} distinct tokens, {slots} slots, {truncated} class names truncated")


class PromptBatcher:
    """Builds training batches: [system prefix | T image tokens | question, assistant | answer]."""

    def __init__(self, tok, lm, system_prompt: str, image_token: str, class_names: list[str]):
        self.lm = lm
        image_id = tok.convert_tokens_to_ids(image_token)
        eos_id = tok.convert_tokens_to_ids(vlm.IM_END)
        self.prefix_ids = None
        self.question_ids = []  # per question: ids after <image>, up to "assistant\n"
        for q in QUESTIONS:
            ids = vlm.prompt_ids(tok, q, system_prompt, image_token)
            cut = ids.index(image_id)
            assert self.prefix_ids in (None, ids[:cut]), "the prefix must not depend on the question"
            self.prefix_ids = ids[:cut]
            self.question_ids.append(ids[cut + 1 :])
        self.answer_ids = [
            tok(answer_text(efficientnet_lite.short_class_name(n)), add_special_tokens=False).input_ids + [eos_id]
            for n in class_names
        ]
        self._check_tokenisation(tok, system_prompt, image_token, class_names)

    def _check_tokenisation(self, tok, system_prompt, image_token, class_names) -> None:
        """The pieces must equal the tokenised full chat (answer included) of the template."""
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": f"{image_token}\n{QUESTIONS[0]}"},
            {"role": "assistant", "content": answer_text(efficientnet_lite.short_class_name(class_names[207]))},
        ]
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        image_id = tok.convert_tokens_to_ids(image_token)
        pieces = self.prefix_ids + [image_id] + self.question_ids[0] + self.answer_ids[207]
        assert full[: len(pieces)] == pieces, "answer tokenisation differs from the chat template's"

    @torch.no_grad()
    def prefix_cache(self):
        """Key/value states of the constant prefix, batch 1 (computed once, no gradient)."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.lm(input_ids=torch.tensor([self.prefix_ids]), use_cache=True)
        cache = out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def batch(self, image_embeds: torch.Tensor, question_idx: list[int], class_ids: list[int]):
        """-> (inputs_embeds (B,L,H) right-padded, attention mask (B,P+L), labels (B,L))."""
        embed = self.lm.get_input_embeddings()
        rows, labels = [], []
        for q, c in zip(question_idx, class_ids):
            text_ids = self.question_ids[q] + self.answer_ids[c]
            rows.append(text_ids)
            n_answer = len(self.answer_ids[c])
            labels.append([-100] * (image_embeds.shape[1] + len(text_ids) - n_answer) + self.answer_ids[c])
        width = max(len(r) for r in rows)
        pad_id = self.answer_ids[0][-1]
        text = embed(torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]))
        inputs = torch.cat([image_embeds, text.to(image_embeds.dtype)], dim=1)
        length = inputs.shape[1]
        label_t = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
        mask = torch.zeros(len(rows), len(self.prefix_ids) + length, dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, : len(self.prefix_ids) + image_embeds.shape[1] + len(r)] = 1
        return inputs, mask, label_t


def lm_loss(lm, batcher, prefix_kv, inputs, mask, labels) -> torch.Tensor:
    """Cross-entropy on the answer tokens, the prefix given as a (batch-expanded) KV cache."""
    from transformers import DynamicCache

    b = inputs.shape[0]
    cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm(inputs_embeds=inputs, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    # position t predicts token t+1
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())


def train(projector, lm, batcher, features, classes, steps: int, batch_size: int, lr: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    trainable = [p for p in projector.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    prefix_kv = batcher.prefix_cache()
    projector.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        pick = torch.randint(len(classes), (batch_size,), generator=gen)
        questions = torch.randint(len(QUESTIONS), (batch_size,), generator=gen).tolist()
        image_embeds = projector(features[pick], classes[pick])
        inputs, mask, labels = batcher.batch(image_embeds, questions, classes[pick].tolist())
        loss = lm_loss(lm, batcher, prefix_kv, inputs, mask, labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {np.mean(losses[-25:]):.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    projector.eval()
    return losses, time.perf_counter() - t0


# ----------------------------------------------------------------------------- 4. evaluation
@torch.inference_mode()
def answer_accuracy(projector, lm, tok, features, class_ids, class_names) -> tuple[float, float]:
    """Greedy answers to "What is in the image?" vs the target answer, one example per row.

    Returns (exact match, match ignoring case): the LM sometimes lower-cases proper nouns
    ("A petri dish." for "A Petri dish."), which still names the right thing.
    """
    cfg = projector.config
    ids = vlm.prompt_ids(tok, vlm.DEFAULT_QUESTION, cfg.system_prompt, cfg.image_token)
    image_id = tok.convert_tokens_to_ids(cfg.image_token)
    exact, loose, shown = 0, 0, 0
    for i in range(len(class_ids)):
        image_embeds = projector(features[i : i + 1], class_ids[i : i + 1])
        text, _, _ = vlm.generate_greedy(lm, tok, vlm.splice_image(lm, ids, image_id, image_embeds), cfg.max_new_tokens)
        target = answer_text(efficientnet_lite.short_class_name(class_names[int(class_ids[i])]))
        exact += text == target
        loose += text.lower() == target.lower()
        if text.lower() != target.lower() and shown < 5:
            print(f"   miss: {text!r} (target {target!r})")
            shown += 1
    return exact / len(class_ids), loose / len(class_ids)


def one_per_class(classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The first example of every distinct class among `indices`."""
    first = {}
    for i in indices.tolist():
        first.setdefault(int(classes[i]), i)
    return torch.tensor(sorted(first.values()))


def evaluate(projector, lm, tok, features, classes, train_idx, val_idx, class_names, seed: int) -> None:
    t0 = time.perf_counter()
    val = one_per_class(classes, val_idx)
    exact, loose = answer_accuracy(projector, lm, tok, features[val], classes[val], class_names)
    print(f"held-out classes ({len(val)} classes, 1 frame each): exact {exact:.2f}, ignoring case {loose:.2f}")
    train = one_per_class(classes, train_idx)[:40]
    exact, loose = answer_accuracy(projector, lm, tok, features[train], classes[train], class_names)
    print(f"training classes ({len(train)} classes, 1 frame each): exact {exact:.2f}, ignoring case {loose:.2f}")
    # Name-path probe over the whole head: 100 random ImageNet classes that never occurred in the
    # data, shown on validation frames (the class id overrides the head's top-1).
    unseen = sorted(set(range(len(class_names))) - set(classes.tolist()))
    probe = torch.tensor(random.Random(seed).sample(unseen, 100))
    frames = val[torch.arange(100) % len(val)]
    exact, loose = answer_accuracy(projector, lm, tok, features[frames], probe, class_names)
    print(f"100 never-seen ImageNet classes (name path): exact {exact:.2f}, ignoring case {loose:.2f}")
    print(f"evaluation {time.perf_counter() - t0:.1f} s")


def split_by_class(classes: torch.Tensor, fraction: float, seed: int):
    """Hold out whole classes, so validation measures names never seen in training."""
    distinct = sorted(set(classes.tolist()))
    held = set(random.Random(seed).sample(distinct, max(1, int(len(distinct) * fraction))))
    is_val = torch.tensor([c in held for c in classes.tolist()])
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=vlm.DEMO_MODEL_DIR)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nanovlm-demo-wheels"))
    ap.add_argument("--frames", type=int, default=4000, help="augmented frames to encode")
    ap.add_argument("--max-per-class", type=int, default=12)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    class_names = efficientnet_lite.load_imagenet_classes(os.path.join(vlm.DEMO_MODEL_DIR, "imagenet_classes.txt"))
    encoder = efficientnet_lite.load_efficientnet_lite0()
    config = projector_lib.ProjectorConfig()
    projector = projector_lib.Projector(config)
    projector.classifier_weight = encoder._fc.weight.detach().half().float()  # as stored (fp16)
    projector.classifier_bias = encoder._fc.bias.detach().half().float()
    tok = vlm.load_tokenizer(config.image_token)
    lm = vlm.load_language_model()
    fill_name_tables(projector, tok, lm, class_names)

    t0 = time.perf_counter()
    photos = load_training_photos(args.cache_dir)
    print(f"{len(photos)} training photos: {', '.join(sorted(photos))}")
    features, classes = build_dataset(encoder, projector, photos, args.frames, args.max_per_class, args.seed)
    train_idx, val_idx = split_by_class(classes, 0.10, args.seed)
    print(
        f"data preparation {time.perf_counter() - t0:.1f} s; train {len(train_idx)} examples, "
        f"validation {len(val_idx)} examples of held-out classes"
    )

    batcher = PromptBatcher(tok, lm, config.system_prompt, config.image_token, class_names)
    losses, train_s = train(
        projector, lm, batcher, features[train_idx], classes[train_idx], args.steps, args.batch_size, args.lr, args.seed
    )
    print(f"training {train_s:.1f} s, final loss (mean of last 25 steps) {np.mean(losses[-25:]):.4f}")

    projector_lib.save_projector(projector, args.out_dir)
    reloaded = projector_lib.load_projector(args.out_dir)  # evaluate what was written (fp16)
    evaluate(reloaded, lm, tok, features, classes, train_idx, val_idx, class_names, args.seed)
    print(
        f"wrote {args.out_dir}/{projector_lib.WEIGHTS_FILE} "
        f"({os.path.getsize(os.path.join(args.out_dir, projector_lib.WEIGHTS_FILE)) / 1e6:.1f} MB); "
        f"total {time.perf_counter() - t_start:.1f} s"
    )


if __name__ == "__main__":
    main()
