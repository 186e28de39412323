"""Train the demo VLM: EfficientNet-Lite0 features -> projector -> SmolLM2-135M-Instruct.

Teaches the LM three answers about what the frozen encoder's own ImageNet head sees:
  - naming: "What is in the image?" -> "A golden retriever.";
  - yes/no: "Is there an animal in the image?" -> "Yes." / "No.", about the class, its everyday
    category (imagenet_categories.tsv: dog, fruit, vehicle, sign, ...) and the category's group
    (animal, food);
  - JSON: the question plus the engine's JSON-mode instruction for the demo schema
    (object_schema.json) -> {"object":"golden retriever","category":"dog","is_animal":true}.
The projector trains, and a low-rank adapter (LoRA) of the LM's attention projections; the
LM's own weights stay frozen (the adapter is merged into them when the model is assembled).

  1. Fetch the training photos: image files that ship inside pinned PyPI wheels (scikit-image,
     scikit-learn, matplotlib), read straight from the wheel zips with `pip download --no-deps`
     (nothing is installed). Licences: see ros2_nanovlm/engine/demo_model/SOURCES.md.
  2. Widen them with heavy augmentation (random resized crops, flips, rotations, colour jitter,
     grey, blur, 2x2 mosaics, blends), run the frozen encoder once per augmented frame and
     pseudo-label it with the head's top-1 class and the category its probabilities add up to
     most. Frequent classes are capped so that many different class names are seen. A seeded
     10% of the classes is held out for validation.
  3. Train in fp32 on the CPU, loss on the answer tokens only, the constant prompt
     prefix (system turn) run once as a KV cache. Naming uses the frames' own labels; yes/no and
     JSON use them half of the time, and otherwise a class drawn evenly over the categories,
     shown with a random frame's visual tokens (the 17 photos give few categories).
  4. Write projector.json + projector.safetensors + lm_adapter.safetensors, then check greedy
     answers on the held-out classes and on ImageNet classes never shown in training.

The data/images photos are the test set (check_demo_vlm.py, bench/demo_questions.py) and are
never used here.

    python training/train_projector.py [--out-dir DIR] [--steps 150] [--seed 0] [--lora-rank 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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
from check_demo_vlm import categories_lib, efficientnet_lite, lm_adapter, projector_lib

from ros2_nanovlm.engine.json_output import json_instruction
from ros2_nanovlm.tools.ask import YES_NO_SCHEMA  # nanovlm-ask --yes-no: {"answer":"yes"|"no"}

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

NAMING_QUESTIONS = [
    "What is in the image?",
    "What do you see?",
    "Describe the image.",
    "What is this?",
    "What does the camera see?",
    "What is shown here?",
]
YES_NO_TEMPLATES = [
    "Is there {x} in the image?",
    "Is there {x}?",
    "Do you see {x}?",
    "Is this {x}?",
    "Does the image show {x}?",
    "Can you see {x} in the picture?",
    "Is there {x} in front of the camera?",
    "Is it {x}?",
]
MASS_NOUNS = {"fruit", "food"}  # "Is there fruit in the image?"
# Wh-questions that name a category word are still answered with the name ("What kinds of fruit
# are in the image?" -> "A lemon."), whatever the word: they are not yes/no questions.
NAMING_TEMPLATES = [
    "What kind of {w} is in the image?",
    "What kinds of {w} are in the image?",
    "Which {w} is this?",
    "What {w} do you see?",
]
JSON_QUESTIONS = ["What is in the image?", "Describe the main object.", "What do you see?"]


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
    """-> (features (N,1280,7,7), top-1 class (N,), category (N,)) of the kept frames."""
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
    features = torch.stack(features)
    with torch.inference_mode():  # the category the projector will show for each frame
        categories = projector.category_ids(projector.class_logits(features))
    print(
        f"frames {num_frames}: kept {len(classes)} in {len(counts)} classes, skipped "
        f"{skipped_low} with top-1 p < 0.10 and {skipped_cap} over the per-class cap {max_per_class}; "
        f"{len(set(categories.tolist()))} categories"
    )
    return features, torch.tensor(classes), categories


# ----------------------------------------------------------------------------- 3. LM side
def answer_text(class_name: str) -> str:
    """ "golden retriever" -> "A golden retriever." (a/an by the first letter)."""
    return f"{article(class_name).capitalize()} {class_name}."


def article(word: str) -> str:
    """The article a yes/no question puts before `word`: "a", "an", or none for a mass noun."""
    if word in MASS_NOUNS:
        return ""
    return "an" if word[0].lower() in "aeiou" else "a"


def yes_no_question(template: str, word: str) -> str:
    return template.format(x=f"{article(word)} {word}".strip())


def json_answer(name: str, category: str) -> str:
    """The JSON the schema-constrained answer should be: compact, keys in the schema's order."""
    value = {"object": name, "category": category, "is_animal": category in categories_lib.ANIMALS}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


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


def fill_category_tables(projector, tok, lm, class_category: list[int]) -> None:
    """Store each class's category, each category word's LM embedding (" dog", one token each)
    and the category index of its group word."""
    names = projector.config.categories
    ids = [tok(" " + name, add_special_tokens=False).input_ids for name in names]
    assert all(len(i) == 1 for i in ids), "every category word must be one token"
    projector.class_category = torch.tensor(class_category)
    projector.category_token_embeds = lm.get_input_embeddings().weight[[i[0] for i in ids]].detach().half().float()
    group = [categories_lib.group_of(name) for name in names]
    projector.category_group = torch.tensor([names.index(g) if g else -1 for g in group])


class Tasks:
    """The three answers the model learns, as token ids after the <image> position:
    naming ("A golden retriever."), yes/no ("Yes." / "No.") and the schema's JSON."""

    def __init__(
        self, tok, system_prompt: str, image_token: str, class_names: list[str], category_names, class_category
    ):
        self.tok = tok
        self.class_category = class_category
        self.image_id = tok.convert_tokens_to_ids(image_token)
        self.eos_id = tok.convert_tokens_to_ids(vlm.IM_END)
        self.system_prompt, self.image_token = system_prompt, image_token
        self.names = [efficientnet_lite.short_class_name(n) for n in class_names]
        self.category_names = list(category_names)
        self.prefix_ids = None
        self._question_cache: dict[str, list[int]] = {}
        self.json_suffix = json_instruction(categories_lib.object_schema())
        self.yes_no_json_suffix = json_instruction(YES_NO_SCHEMA)
        for q in NAMING_QUESTIONS:  # the prefix (system turn) must not depend on the question
            self.question_ids(q)
        self.yes = tok("Yes.", add_special_tokens=False).input_ids + [self.eos_id]
        self.no = tok("No.", add_special_tokens=False).input_ids + [self.eos_id]
        self._check_tokenisation()

    def question_ids(self, question: str) -> list[int]:
        """Ids after <image>, up to and including "assistant\\n"."""
        if question not in self._question_cache:
            ids = vlm.prompt_ids(self.tok, question, self.system_prompt, self.image_token)
            cut = ids.index(self.image_id)
            assert self.prefix_ids in (None, ids[:cut]), "the prefix must not depend on the question"
            self.prefix_ids = ids[:cut]
            self._question_cache[question] = ids[cut + 1 :]
        return self._question_cache[question]

    def answer_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids + [self.eos_id]

    def _check_tokenisation(self) -> None:
        """The pieces must equal the tokenised full chat (answer included) of the template."""
        for question, answer in (
            (NAMING_QUESTIONS[0], answer_text(self.names[207])),
            (yes_no_question(YES_NO_TEMPLATES[0], "fruit"), "No."),
            (JSON_QUESTIONS[0] + self.json_suffix, json_answer(self.names[207], "dog")),
            (yes_no_question(YES_NO_TEMPLATES[0], "dog") + self.yes_no_json_suffix, '{"answer":"yes"}'),
        ):
            messages = [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": f"{self.image_token}\n{question}"},
                {"role": "assistant", "content": answer},
            ]
            full = self.tok(self.tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
            pieces = self.prefix_ids + [self.image_id] + self.question_ids(question) + self.answer_ids(answer)
            assert full[: len(pieces)] == pieces, f"tokenisation of {answer!r} differs from the chat template's"

    def naming(self, rng: random.Random, class_id: int, with_word: bool = False):
        if with_word:
            question = rng.choice(NAMING_TEMPLATES).format(w=rng.choice(self.category_names))
        else:
            question = rng.choice(NAMING_QUESTIONS)
        return self.question_ids(question), self.answer_ids(answer_text(self.names[class_id]))

    def true_words(self, class_id: int, category: int) -> set[str]:
        name = self.category_names[category]
        group = categories_lib.group_of(name)
        return {self.names[class_id].lower(), name} | ({group} if group else set())

    def yes_no(self, rng: random.Random, class_id: int, category: int, answer: bool | None = None, as_json=False):
        """A question about a word the image tokens show (category, group, class name) or do not;
        as_json: asked with the JSON instruction of nanovlm-ask --yes-no's schema."""
        true = self.true_words(class_id, category)
        if answer is None:
            answer = rng.random() < 0.5
        name = self.category_names[category]
        group = categories_lib.group_of(name)
        if answer:
            pick = rng.random()
            word = group if group and pick < 0.25 else name if pick < 0.65 else self.names[class_id]
        elif rng.random() < 0.6:  # another category
            word = rng.choice([c for c in self.category_names if c not in true])
        else:  # another class, of another category
            while True:
                other = rng.randrange(len(self.names))
                if self.names[other].lower() not in true and self.class_category[other] != category:
                    word = self.names[other]
                    break
        question = yes_no_question(rng.choice(YES_NO_TEMPLATES), word)
        if as_json:  # nanovlm-ask --yes-no
            reply = json.dumps({"answer": "yes" if answer else "no"}, separators=(",", ":"))
            return self.question_ids(question + self.yes_no_json_suffix), self.answer_ids(reply)
        return self.question_ids(question), self.yes if answer else self.no

    def json(self, rng: random.Random, class_id: int, category: int):
        question = rng.choice(JSON_QUESTIONS) + self.json_suffix
        return self.question_ids(question), self.answer_ids(
            json_answer(self.names[class_id], self.category_names[category])
        )

    @torch.no_grad()
    def prefix_cache(self, lm):
        """Key/value states of the constant prefix, batch 1 (computed once, no gradient)."""
        out = lm(input_ids=torch.tensor([self.prefix_ids]), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def batch(self, lm, image_embeds: torch.Tensor, rows: list[tuple[list[int], list[int]]]):
        """-> (inputs_embeds (B,L,H) right-padded, attention mask (B,P+L), labels (B,L))."""
        embed = lm.get_input_embeddings()
        texts, labels = [], []
        for question, answer in rows:
            texts.append(question + answer)
            labels.append([-100] * (image_embeds.shape[1] + len(question)) + answer)
        width = max(len(r) for r in texts)
        text = embed(torch.tensor([r + [self.eos_id] * (width - len(r)) for r in texts]))
        inputs = torch.cat([image_embeds, text.to(image_embeds.dtype)], dim=1)
        length = inputs.shape[1]
        label_t = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
        mask = torch.zeros(len(rows), len(self.prefix_ids) + length, dtype=torch.long)
        for i, r in enumerate(texts):
            mask[i, : len(self.prefix_ids) + image_embeds.shape[1] + len(r)] = 1
        return inputs, mask, label_t


def lm_loss(lm, prefix_kv, inputs, mask, labels) -> torch.Tensor:
    """Cross-entropy on the answer tokens, the prefix given as a (batch-expanded) KV cache. The
    vocabulary head runs only where an answer token is predicted. fp32: this CPU has no bf16
    matrix instructions, and autocast to bf16 ran 3x slower."""
    from transformers import DynamicCache

    b = inputs.shape[0]
    cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv])
    hidden = lm.model(inputs_embeds=inputs, attention_mask=mask, past_key_values=cache, use_cache=True)
    targets = labels[:, 1:]  # position t predicts token t+1
    at = targets != -100
    logits = lm.lm_head(hidden.last_hidden_state[:, :-1][at])
    return F.cross_entropy(logits, targets[at])


class ExampleSampler:
    """Draws (frame, class, category) for each task: the frame's own head outputs, or (for yes/no
    and JSON, half of the time) a class drawn over all categories shown with a random frame, so
    that every category and many more names reach the LM than the 17 photos give."""

    def __init__(self, classes, categories, class_category: list[int], allowed_classes: list[int], seed: int):
        self.classes, self.categories, self.class_category = classes, categories, class_category
        self.gen = random.Random(seed)
        by_category: dict[int, list[int]] = {}
        for c in allowed_classes:
            by_category.setdefault(class_category[c], []).append(c)
        self.by_category = [by_category[k] for k in sorted(by_category)]

    def draw(self, n: int, override: float):
        """-> (frame indices, class ids, category ids, overridden flags)."""
        frames, class_ids, category_ids, overridden = [], [], [], []
        for _ in range(n):
            i = self.gen.randrange(len(self.classes))
            frames.append(i)
            if self.gen.random() < override:
                c = self.gen.choice(self.gen.choice(self.by_category))
                class_ids.append(c)
                category_ids.append(self.class_category[c])
                overridden.append(True)
            else:
                class_ids.append(int(self.classes[i]))
                category_ids.append(int(self.categories[i]))
                overridden.append(False)
        return frames, class_ids, category_ids, overridden


def train(projector, lm, tasks, features, classes, categories, allowed_classes, args):
    rng = random.Random(args.seed)
    sampler = ExampleSampler(classes, categories, tasks.class_category, allowed_classes, args.seed)
    projector_params = [p for p in projector.parameters() if p.requires_grad]
    adapter_params = [p for p in lm.parameters() if p.requires_grad]  # the LoRA factors, if any
    trainable = projector_params + adapter_params
    groups = [{"params": projector_params, "lr": args.lr}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": args.lora_lr})
    optim = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = args.steps
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    prefix_kv = tasks.prefix_cache(lm)
    projector.train()
    t0, losses = time.perf_counter(), []

    def image_tokens(frames, class_ids, category_ids):
        return projector(features[frames], torch.tensor(class_ids), torch.tensor(category_ids))

    for step in range(steps):
        # Short answers: naming on the frames' own classes (a third of them asked with a
        # category word), yes/no half of the time on drawn classes.
        n_name = args.batch_size * 3 // 8
        f1, c1, k1, _ = sampler.draw(n_name, override=0.0)
        f2, c2, k2, _ = sampler.draw(args.batch_size - n_name, override=0.5)
        rows = [tasks.naming(rng, c, with_word=i % 3 == 2) for i, c in enumerate(c1)]
        rows += [tasks.yes_no(rng, c, k) for c, k in zip(c2, k2)]
        embeds = image_tokens(f1 + f2, c1 + c2, k1 + k2)
        loss = lm_loss(lm, prefix_kv, *tasks.batch(lm, embeds, rows))
        # JSON answers (long prompts: the schemas), smaller batches, alternating: the demo
        # schema, then nanovlm-ask --yes-no's (a shorter prompt: twice as many).
        if step % 2 == 0:
            f3, c3, k3, _ = sampler.draw(args.json_batch_size, override=0.5)
            json_rows = [tasks.json(rng, c, k) for c, k in zip(c3, k3)]
        else:
            f3, c3, k3, _ = sampler.draw(2 * args.json_batch_size, override=0.5)
            json_rows = [tasks.yes_no(rng, c, k, as_json=True) for c, k in zip(c3, k3)]
        embeds = image_tokens(f3, c3, k3)
        loss = loss + lm_loss(lm, prefix_kv, *tasks.batch(lm, embeds, json_rows))
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
EVAL_QA = 20  # examples per set asked the yes/no and JSON questions


@torch.inference_mode()
def greedy(lm, tok, tasks, projector, features, class_id, category, question_ids, max_new_tokens):
    image_embeds = projector(features, torch.tensor([class_id]), torch.tensor([category]))
    ids = tasks.prefix_ids + [tasks.image_id] + question_ids
    text, _, _ = vlm.generate_greedy(lm, tok, vlm.splice_image(lm, ids, tasks.image_id, image_embeds), max_new_tokens)
    return text


def evaluate(projector, lm, tok, tasks, features, classes, categories, val_idx, probe, seed: int) -> None:
    """Greedy answers (no grammar here; the engine adds it) on held-out classes and on ImageNet
    classes never shown in training, each with a frame's visual tokens."""
    t0 = time.perf_counter()
    rng = random.Random(seed + 1)
    val = one_per_class(classes, val_idx)
    cases = {
        f"held-out classes ({len(val)}, their own frames)": [
            (int(i), int(classes[i]), int(categories[i])) for i in val
        ],
        "100 never-shown ImageNet classes (name path, a held-out frame each)": [
            (int(val[j % len(val)]), c, tasks.class_category[c]) for j, c in enumerate(probe)
        ],
    }
    max_new = projector.config.max_new_tokens
    for label, items in cases.items():
        named = yes_no_right = yes_no_json_right = json_exact = json_category = 0
        misses = []
        for n, (i, c, k) in enumerate(items):
            f = features[i : i + 1]
            text = greedy(lm, tok, tasks, projector, f, c, k, tasks.question_ids(vlm.DEFAULT_QUESTION), max_new)
            named += text.lower() == answer_text(tasks.names[c]).lower()
            if n >= EVAL_QA:  # yes/no and JSON on the first EVAL_QA only: keeps the run short
                continue
            for expected in (True, False):
                q, _ = tasks.yes_no(rng, c, k, answer=expected)
                answer = greedy(lm, tok, tasks, projector, f, c, k, q, 3)
                yes_no_right += answer == ("Yes." if expected else "No.")
                if answer != ("Yes." if expected else "No.") and len(misses) < 4:
                    misses.append(f"{tok.decode(q).strip().splitlines()[0]!r} ({tasks.names[c]}) -> {answer!r}")
            expected = n % 2 == 0
            q, _ = tasks.yes_no(rng, c, k, answer=expected, as_json=True)
            answer = greedy(lm, tok, tasks, projector, f, c, k, q, 8)
            yes_no_json_right += answer == json.dumps({"answer": "yes" if expected else "no"}, separators=(",", ":"))
            q, _ = tasks.json(rng, c, k)
            text = greedy(lm, tok, tasks, projector, f, c, k, q, 32)
            target = json_answer(tasks.names[c], tasks.category_names[k])
            json_exact += text.lower() == target.lower()
            with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object
                json_category += json.loads(text).get("category") == tasks.category_names[k]
        qa = min(len(items), EVAL_QA)
        print(
            f"{label}: naming {named / len(items):.2f}; first {qa}: yes/no {yes_no_right / (2 * qa):.2f}, "
            f"yes/no as --yes-no JSON {yes_no_json_right / qa:.2f}, "
            f"JSON exact {json_exact / qa:.2f}, JSON category {json_category / qa:.2f}"
        )
        for miss in misses:
            print(f"   yes/no miss: {miss}")
    print(f"evaluation {time.perf_counter() - t0:.1f} s")


def one_per_class(classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The first example of every distinct class among `indices`."""
    first = {}
    for i in indices.tolist():
        first.setdefault(int(classes[i]), i)
    return torch.tensor(sorted(first.values()))


def split_by_class(classes: torch.Tensor, fraction: float, seed: int):
    """Hold out whole classes, so validation measures names never seen in training."""
    distinct = sorted(set(classes.tolist()))
    held = set(random.Random(seed).sample(distinct, max(1, int(len(distinct) * fraction))))
    is_val = torch.tensor([c in held for c in classes.tolist()])
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1), held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=vlm.DEMO_MODEL_DIR)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nanovlm-demo-wheels"))
    ap.add_argument("--frames", type=int, default=4000, help="augmented frames to encode")
    ap.add_argument("--max-per-class", type=int, default=12)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16, help="naming + yes/no examples a step")
    ap.add_argument(
        "--json-batch-size",
        type=int,
        default=2,
        help="demo-schema JSON examples every other step (twice as many --yes-no ones between)",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8, help="LM adapter rank (0: projector only)")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 when another process is busy)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    class_names = efficientnet_lite.load_imagenet_classes(os.path.join(vlm.DEMO_MODEL_DIR, "imagenet_classes.txt"))
    category_names, class_category = categories_lib.load_class_categories(vlm.DEMO_MODEL_DIR)
    encoder = efficientnet_lite.load_efficientnet_lite0()
    config = projector_lib.ProjectorConfig(category_slots=2, categories=list(category_names))
    projector = projector_lib.Projector(config)
    projector.classifier_weight = encoder._fc.weight.detach().half().float()  # as stored (fp16)
    projector.classifier_bias = encoder._fc.bias.detach().half().float()
    tok = vlm.load_tokenizer(config.image_token)
    lm = vlm.load_language_model()
    fill_name_tables(projector, tok, lm, class_names)
    fill_category_tables(projector, tok, lm, class_category)

    t0 = time.perf_counter()
    photos = load_training_photos(args.cache_dir)
    print(f"{len(photos)} training photos: {', '.join(sorted(photos))}")
    features, classes, categories = build_dataset(
        encoder, projector, photos, args.frames, args.max_per_class, args.seed
    )
    train_idx, val_idx, held = split_by_class(classes, 0.10, args.seed)
    # 100 ImageNet classes that no frame gives, kept out of the drawn classes too: a clean probe
    # of the name path.
    unseen = sorted(set(range(1000)) - set(classes.tolist()))
    probe = random.Random(args.seed).sample(unseen, 100)
    allowed = sorted(set(range(1000)) - held - set(probe))
    print(
        f"data preparation {time.perf_counter() - t0:.1f} s; train {len(train_idx)} examples, "
        f"validation {len(val_idx)} examples of {len(held)} held-out classes; {len(allowed)} classes may be drawn"
    )

    tasks = Tasks(tok, config.system_prompt, config.image_token, class_names, category_names, class_category)
    if args.lora_rank:
        lora_params = lm_adapter.add_lora(lm, args.lora_rank, alpha=2 * args.lora_rank, seed=args.seed)
        print(f"LM adapter: rank {args.lora_rank} on {', '.join(lm_adapter.TARGETS)}, "
              f"{sum(p.numel() for p in lora_params) / 1e6:.2f} M parameters")  # fmt: skip
    losses, train_s = train(
        projector, lm, tasks, features[train_idx], classes[train_idx], categories[train_idx], allowed, args
    )
    print(f"training {train_s:.1f} s, final loss (mean of last 25 steps) {np.mean(losses[-25:]):.4f}")

    projector_lib.save_projector(projector, args.out_dir)
    reloaded = projector_lib.load_projector(args.out_dir)  # evaluate what was written (fp16)
    adapter_path = os.path.join(args.out_dir, lm_adapter.ADAPTER_FILE)
    if os.path.exists(adapter_path):
        os.remove(adapter_path)  # never leave an adapter of another run beside this projector
    if args.lora_rank:
        lm_adapter.save_adapter(lm, args.out_dir)
        lm_adapter.unwrap_lora(lm)
        lm_adapter.merge_adapter(lm, args.out_dir)  # as build.py does
    evaluate(reloaded, lm, tok, tasks, features, classes, categories, val_idx, probe, args.seed)
    sizes = ", ".join(
        f"{name} {os.path.getsize(os.path.join(args.out_dir, name)) / 1e6:.1f} MB"
        for name in (projector_lib.WEIGHTS_FILE, lm_adapter.ADAPTER_FILE)
        if os.path.exists(os.path.join(args.out_dir, name))
    )
    print(f"wrote {args.out_dir}: {sizes}; total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
