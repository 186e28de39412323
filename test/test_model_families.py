"""Original checkpoints of the seed's model families, loaded offline and converted on load
(engine/families): LLaVA-1.5 and LLaVA-1.6 as liuhaotian publishes them and Obsidian-3B, each
written here tiny (hidden 64, 2 layers, a 32 px CLIP tower) in its own layout: config.json with
the original keys, weights under the original names in the original shard layout, a tokenizer
without an <image> token, and the CLIP tower only in a fake Hugging Face cache.

The reference for the logits is the original computation, written out here: CLIP hidden states
of layer -2 without CLS -> mm_projector (Linear, GELU, Linear) -> spliced where LLaVA's
tokenizer_image_token puts its -200 marker -> the language model under its own weight names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ros2_nanovlm.engine import EngineConfig, ModelLoadError, Turn, VLMEngine, families
from ros2_nanovlm.engine.families import llava_original, obsidian

TOWER = "openai/clip-vit-large-patch14-336"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGE_SIZE, PATCH = 32, 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


# ---------------------------------------------------------------- writing the original layouts


def byte_tokenizer(specials: list[str], *, add_bos: bool, extra: tuple[str, ...] = ()):
    """A byte-level tokenizer (as engine/tiny.py makes one) WITHOUT an <image> token, as the
    original checkpoints ship theirs; `add_bos` makes it prepend BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos = specials[1] if add_bos else specials[0]
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    eos = specials[2] if add_bos else specials[0]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=specials[0], bos_token=bos, eos_token=eos)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]} if specials[3:] else {})
    tokenizer.add_tokens(list(extra))
    return tokenizer


def llama_tokenizer():
    return byte_tokenizer(["<unk>", "<s>", "</s>"], add_bos=True)


def neox_tokenizer():
    return byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], add_bos=False, extra=("###",))


def write_tower(cache: Path, seed: int = 1) -> Path:
    """A tiny full CLIP model (text and vision halves, as openai's repositories hold) in the
    huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    from transformers import CLIPConfig, CLIPModel

    repo = cache / f"models--{TOWER.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(snapshot)
    preprocessor = {  # openai's preprocessor_config.json, at this tower's size
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": IMAGE_SIZE,
    }
    (snapshot / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def llava_config(tokenizer, **overrides) -> dict:
    """config.json of liuhaotian/llava-v1.5-7b, shrunk."""
    config = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **TEXT,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "vocab_size": len(tokenizer),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    config.update(overrides)
    return config


def language_model(config: dict, stablelm: bool = False):
    """The original language model (its weight names are the checkpoint's)."""
    from transformers import LlamaConfig, LlamaForCausalLM, StableLmConfig, StableLmForCausalLM

    keys = {k: v for k, v in config.items() if k in TEXT or k in ("vocab_size", "rope_theta")}
    if stablelm:
        text = StableLmConfig(**keys, partial_rotary_factor=config["rope_pct"], layer_norm_eps=config["norm_eps"])
        return StableLmForCausalLM(text)
    return LlamaForCausalLM(LlamaConfig(**keys, rms_norm_eps=config["rms_norm_eps"]))


def original_weights(config: dict, *, stablelm: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights under the original names, in float16 as published."""
    torch.manual_seed(seed)
    state = dict(language_model(config, stablelm).state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] * 20.0  # clear greedy winners, as tiny.py does
    hidden, vision = config["hidden_size"], config["mm_hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(vision, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    state.update((f"model.mm_projector.{name}", tensor) for name, tensor in projector.state_dict().items())
    return {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in state.items()}


def write_shards(directory: Path, state: dict, *, safetensors: bool, shards: int = 2) -> None:
    """Shards and an index, named as the originals are (pytorch_model-00001-of-00002.bin +
    pytorch_model.bin.index.json; 1.6: model-00001-of-00002.safetensors + model.safetensors.index.json)."""
    from safetensors.torch import save_file

    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        part = {name: state[name] for name in names[index::shards]}
        if safetensors:
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(directory / file), metadata={"format": "pt"})
        else:
            file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index_name = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_checkpoint(directory: Path, config: dict, state: dict, tokenizer, *, safetensors: bool = False) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(directory, state, safetensors=safetensors)
    tokenizer.save_pretrained(directory)
    return directory


def write_llava15(directory: Path, **overrides) -> Path:
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer, **overrides)
    return write_checkpoint(directory, config, original_weights(config), tokenizer)


PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def write_llava16(directory: Path, tower_dir: Path) -> Path:
    """llava-v1.6-vicuna layout: anyres, image_newline, and the fine-tuned tower inside the
    checkpoint (model.vision_tower.vision_tower.vision_model.*), here different from the cache's."""
    from safetensors.torch import load_file

    tokenizer = llama_tokenizer()
    config = llava_config(
        tokenizer, image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial_unpad"
    )
    config["unfreeze_mm_vision_tower"] = True
    state = original_weights(config)
    torch.manual_seed(7)
    state["model.image_newline"] = torch.randn(config["hidden_size"]).to(torch.float16)
    tower = load_file(str(tower_dir / "model.safetensors"))
    for name, tensor in tower.items():
        if name.startswith("vision_model."):
            state["model.vision_tower.vision_tower." + name] = (tensor + 0.01 * torch.randn_like(tensor)).to(
                torch.float16
            )
    return write_checkpoint(directory, config, state, tokenizer, safetensors=True)


def obsidian_config(tokenizer) -> dict:
    """config.json of NousResearch/Obsidian-3B-V0.5 (stablelm_epoch keys), shrunk."""
    return {
        "_name_or_path": "Obsidian-3B-V0.5",
        "architectures": ["LlavaStableLMEpochForCausalLM"],
        "model_type": "llava_stablelm_epoch",
        **TEXT,
        "num_heads": 4,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "norm_eps": 1e-05,
        "rope_pct": 0.25,
        "rope_theta": 10000,
        "rotary_scaling_factor": 1.0,
        "vocab_size": len(tokenizer),
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def write_obsidian(directory: Path) -> Path:
    tokenizer = neox_tokenizer()
    config = obsidian_config(tokenizer)
    return write_checkpoint(directory, config, original_weights(config, stablelm=True), tokenizer)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fake Hugging Face cache with the tower, and one checkpoint of each family."""
    root = tmp_path_factory.mktemp("families")
    cache = root / "hf-cache"
    tower = write_tower(cache)
    return {
        "cache": cache,
        "tower": tower,
        "llava15": write_llava15(root / "llava-v1.5-tiny"),
        "llava16": write_llava16(root / "llava-v1.6-vicuna-tiny", tower),
        "obsidian": write_obsidian(root / "Obsidian-3B-tiny"),
        "root": root,
    }


@pytest.fixture(autouse=True)
def offline_cache(store, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(store["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NANOVLM_VISION_TOWER", raising=False)


# ---------------------------------------------------------------- the original computation


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's mm_utils.tokenizer_image_token: each text chunk tokenized alone, BOS kept only
    on the first, -200 where the prompt says <image>."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(-200)
        ids.extend(chunk[offset:])
    return ids


def expand2square(image, background):
    """LLaVA's expand2square (image_aspect_ratio 'pad')."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def original_pixels(frame: np.ndarray, tower_dir: Path) -> torch.Tensor:
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(tower_dir))
    background = tuple(int(x * 255) for x in processor.image_mean)
    square = expand2square(Image.fromarray(frame), background)
    return processor(images=square, return_tensors="pt")["pixel_values"]


def original_logits(directory: Path, tower_dir: Path, ids: list[int], pixels: torch.Tensor, stablelm=False):
    """LlavaMetaForCausalLM's forward for one image: the CLIP tower from the cache, the
    projector and the language model from the checkpoint under their own names."""
    from transformers import CLIPVisionModel

    from ros2_nanovlm.engine.families.checkpoint import load_weights

    config = json.loads((directory / "config.json").read_text())
    state = {name: tensor.float() for name, tensor in load_weights(directory).items()}
    lm = language_model(config, stablelm)
    lm.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.mm_projector.")})
    hidden, vision = config["hidden_size"], config["mm_hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(vision, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    projector.load_state_dict(
        {k.removeprefix("model.mm_projector."): v for k, v in state.items() if "mm_projector" in k}
    )
    tower = CLIPVisionModel.from_pretrained(str(tower_dir)).eval()
    with torch.inference_mode():
        features = tower(pixels, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]][:, 1:]
        image = projector(features)[0]
        at = ids.index(-200)
        embed = lm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:at])), image, embed(torch.tensor(ids[at + 1 :]))])
        return lm(inputs_embeds=embeds[None]).logits[0]


def spliced_logits(model, ids: list[int], image_token_id: int, features: torch.Tensor) -> torch.Tensor:
    """A transformers LLaVA's logits with `features` at its image positions (as the engine
    splices them: the image token id lies past the original vocabulary)."""
    with torch.inference_mode():
        tensor = torch.tensor(ids)
        is_image = tensor == image_token_id
        embeds = model.get_input_embeddings()(tensor.masked_fill(is_image, 0))
        embeds[is_image] = features.to(embeds.dtype)
        return model(inputs_embeds=embeds[None]).logits[0]


def collapse_image(ids: list[int], image_token_id: int) -> list[int]:
    """Engine prompt ids with the image's run of tokens as LLaVA's single -200 marker."""
    out: list[int] = []
    for token in ids:
        if token == image_token_id:
            if not out or out[-1] != -200:
                out.append(-200)
        else:
            out.append(token)
    return out


def engine_for(path: Path) -> VLMEngine:
    return VLMEngine.load(EngineConfig(model_path=str(path), device="cpu", max_new_tokens=4))


def prompt_of(engine: VLMEngine, frame: np.ndarray, question: str = "What is this?"):
    """The engine's rendered prompt and token ids for one question about `frame`."""
    backend = engine._backend
    features = backend.encode_image(frame)
    turns = (Turn("user", question, frame),)
    rendered = backend.prompter.render("", turns)
    tokenized = backend.prompter.tokenize("", turns, [("frame", len(features))])
    return rendered, tokenized.ids, features


# ---------------------------------------------------------------- (a) recognised, offline


def test_each_layout_is_recognised_by_its_family_from_config_alone(store, tiny_llava, tiny_llava_next):
    assert families.find(store["llava15"]) is llava_original
    assert families.find(store["llava16"]) is llava_original
    assert families.find(store["obsidian"]) is obsidian
    # transformers directories are no family's: they load exactly as before
    assert families.find(tiny_llava) is None
    assert families.find(tiny_llava_next) is None
    assert families.find(store["tower"]) is None


def test_llava15_loads_offline_with_the_tower_from_the_cache(store):
    model, processor = families.load(store["llava15"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    # The tokenizer gained LLaVA's placeholder as one special token, past the original vocabulary.
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert model.config.image_token_id == model.config.text_config.vocab_size
    assert model.generation_config.eos_token_id == [processor.tokenizer.eos_token_id]


# ---------------------------------------------------------------- (b) the same numbers


def test_llava15_logits_equal_the_original_computation(store, photos):
    """Prompt ids, pixels and logits equal LLaVA's own pipeline: conv_llava_v1, expand2square
    padding, tokenizer_image_token, layer -2 without CLS, mm_projector, Llama."""
    frame = photos["dogs"]
    engine = engine_for(store["llava15"])
    backend = engine._backend
    rendered, ids, features = prompt_of(engine, frame)
    assert rendered == f"{LLAVA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"

    original_ids = tokenizer_image_token(rendered, llama_tokenizer())
    image_token_id = backend.prompter.image_token_id
    assert collapse_image(ids, image_token_id) == original_ids
    assert len(features) == (IMAGE_SIZE // PATCH) ** 2

    pixels = original_pixels(frame, store["tower"])
    processed = backend.encode_image._image_processor(images=frame, return_tensors="pt")["pixel_values"]
    assert torch.allclose(processed, pixels, atol=1e-6)

    reference = original_logits(store["llava15"], store["tower"], original_ids, pixels)
    logits = spliced_logits(backend.model, ids, image_token_id, features)
    assert logits.shape == reference.shape
    assert torch.allclose(logits, reference, atol=1e-4), (logits - reference).abs().max()


def test_llava16_logits_equal_the_weights_assembled_by_hand(store, photos):
    """anyres: LlavaNextForConditionalGeneration holding the checkpoint's own fine-tuned tower
    and image_newline (not the cache's tower), with the checkpoint's pinpoints."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from ros2_nanovlm.engine.families.checkpoint import load_weights

    frame = photos["fruit"]
    engine = engine_for(store["llava16"])
    backend = engine._backend
    model = backend.model
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert model.config.image_grid_pinpoints == PINPOINTS
    rendered, ids, features = prompt_of(engine, frame)
    assert rendered == f"{LLAVA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"

    config = json.loads((store["llava16"] / "config.json").read_text())
    tower_config = json.loads((store["tower"] / "config.json").read_text())["vision_config"]
    reference_config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**tower_config),
        text_config=LlamaConfig(**TEXT, vocab_size=config["vocab_size"], rms_norm_eps=1e-5),
        image_token_id=backend.prompter.image_token_id,
        image_grid_pinpoints=PINPOINTS,
    )
    reference = LlavaNextForConditionalGeneration(reference_config).eval()
    renamed = {}
    for name, tensor in load_weights(store["llava16"]).items():
        if name.startswith("model.vision_tower.vision_tower.vision_model."):
            name = "model.vision_tower." + name.removeprefix("model.vision_tower.vision_tower.vision_model.")
        elif name.startswith("model.mm_projector."):
            index, kind = name.removeprefix("model.mm_projector.").split(".")
            name = f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{kind}"
        elif name.startswith("model.") and name != "model.image_newline":
            name = "model.language_model." + name.removeprefix("model.")
        renamed[name] = tensor.float()
    reference.load_state_dict(renamed, strict=True)

    inputs = backend.encode_image._image_processor(images=frame, return_tensors="pt")
    with torch.inference_mode():
        expected = reference.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    expected = torch.cat(list(getattr(expected, "pooler_output", expected)))
    assert features.shape == expected.shape
    assert torch.allclose(features, expected, atol=1e-5)
    logits = spliced_logits(model, ids, backend.prompter.image_token_id, features)
    reference_logits = spliced_logits(reference, ids, backend.prompter.image_token_id, expected)
    assert torch.allclose(logits, reference_logits, atol=1e-4)


def test_obsidian_logits_equal_the_original_computation(store, photos):
    """stablelm_epoch -> StableLm (rope_pct 0.25, LayerNorm) behind the same LLaVA splice, and
    Obsidian's ChatML-with-### prompt."""
    frame = photos["dogs"]
    engine = engine_for(store["obsidian"])
    backend = engine._backend
    assert type(backend.model.model.language_model).__name__ == "StableLmModel"
    assert backend.model.config.text_config.partial_rotary_factor == 0.25
    rendered, ids, features = prompt_of(engine, frame)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant.\n###\n"
        "<|im_start|>user\n<image>\nWhat is this?\n###\n<|im_start|>assistant\n"
    )
    tokenizer = neox_tokenizer()
    assert tokenizer.convert_tokens_to_ids("###") in backend.eos_ids
    original_ids = tokenizer_image_token(rendered, tokenizer)
    image_token_id = backend.prompter.image_token_id
    assert collapse_image(ids, image_token_id) == original_ids

    pixels = original_pixels(frame, store["tower"])
    reference = original_logits(store["obsidian"], store["tower"], original_ids, pixels, stablelm=True)
    logits = spliced_logits(backend.model, ids, image_token_id, features)
    assert torch.allclose(logits, reference, atol=1e-4), (logits - reference).abs().max()


# ---------------------------------------------------------------- (c) the engine answers


@pytest.mark.parametrize("name", ["llava15", "llava16", "obsidian"])
def test_the_engine_answers_through_each_family(store, photos, name):
    engine = engine_for(store[name])
    answer = engine.ask("What is this?", photos["dogs"], max_new_tokens=4)
    assert 1 <= len(answer.token_ids) <= 4
    assert answer.prompt_tokens > (IMAGE_SIZE // PATCH) ** 2
    follow_up = engine.chat().ask("What is this?", photos["dogs"], max_new_tokens=4)
    assert follow_up.token_ids == answer.token_ids  # same question, same image: same greedy answer
    assert follow_up.image_cache_hit


def test_a_tower_given_as_a_directory_needs_no_cache(store, photos, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("NANOVLM_VISION_TOWER", str(store["tower"]))
    model, _ = families.load(store["llava15"])
    assert model.config.vision_config.hidden_size == 32
    monkeypatch.delenv("NANOVLM_VISION_TOWER")
    model, _ = families.load(store["llava15"], vision_tower=store["tower"])
    assert model.config.vision_config.hidden_size == 32


def test_a_linear_projector_is_exact(store, tmp_path):
    """mm_projector_type linear (one Linear) as transformers' two-layer projector: linear_1,
    an identity activation and an identity linear_2 give the same numbers."""
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer, mm_projector_type="linear")
    state = original_weights(config)
    for name in [n for n in state if n.startswith("model.mm_projector.")]:
        del state[name]
    torch.manual_seed(3)
    weight, bias = torch.randn(64, 32).half(), torch.randn(64).half()
    state.update({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias})
    path = write_checkpoint(tmp_path / "llava-linear", config, state, tokenizer)
    model, _ = families.load(path)
    features = torch.randn(1, 16, 32)
    with torch.inference_mode():
        projected = model.model.multi_modal_projector(features)
    assert torch.equal(projected, torch.nn.functional.linear(features, weight.float(), bias.float()))


# ---------------------------------------------------------------- (d) clear errors


def test_a_missing_tower_names_it_and_how_to_provide_it(store, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError) as error:
        engine_for(store["llava15"])
    message = str(error.value)
    assert TOWER in message
    assert "NANOVLM_VISION_TOWER" in message
    assert "HF_HUB_CACHE" in message
    assert str(tmp_path / "empty-cache") in message


def test_a_tower_directory_without_config_is_named(store, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVLM_VISION_TOWER", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        families.load(store["llava15"])


def test_missing_projector_weights_are_named(tmp_path):
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer)
    state = original_weights(config)
    del state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"]
    path = write_checkpoint(tmp_path / "no-projector", config, state, tokenizer)
    with pytest.raises(ModelLoadError, match=r"lacks the projector weights model\.mm_projector\.2\.weight"):
        engine_for(path)


@pytest.mark.parametrize("projector", ["mlp3x_gelu", "qformer"])
def test_an_unknown_projector_type_is_named(tmp_path, projector):
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer, mm_projector_type=projector)
    path = write_checkpoint(tmp_path / "odd-projector", config, original_weights(config), tokenizer)
    with pytest.raises(ModelLoadError, match=f"mm_projector_type '{projector}' is not supported"):
        engine_for(path)


def test_a_missing_shard_is_named(store, tmp_path):
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer)
    path = write_checkpoint(tmp_path / "lost-shard", config, original_weights(config), tokenizer)
    (path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"pytorch_model-00002-of-00002\.bin"):
        families.load(path)


def test_missing_language_model_weights_are_named(tmp_path):
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer)
    state = original_weights(config)
    del state["model.layers.1.mlp.up_proj.weight"]
    path = write_checkpoint(tmp_path / "lost-layer", config, state, tokenizer)
    with pytest.raises(ModelLoadError, match=r"missing model\.language_model\.layers\.1\.mlp\.up_proj\.weight"):
        families.load(path)


def test_anyres_without_image_newline_is_named(store, tmp_path):
    tokenizer = llama_tokenizer()
    config = llava_config(
        tokenizer, image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial_unpad"
    )
    path = write_checkpoint(tmp_path / "no-newline", config, original_weights(config), tokenizer)
    with pytest.raises(ModelLoadError, match=r"lacks model\.image_newline"):
        families.load(path)


def test_llava_follow_ups_keep_the_vicuna_v1_format(store):
    """conv_llava_v1 over several turns: SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"""
    _, processor = families.load(store["llava15"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two dogs."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which breeds?"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        f"{LLAVA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: Two dogs.</s>USER: Which breeds? ASSISTANT:"
    )
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    rendered = processor.apply_chat_template(system + messages[:1], add_generation_prompt=True, tokenize=False)
    assert rendered == "Be brief. USER: <image>\nWhat is this? ASSISTANT:"


def test_llava16_mistral_uses_mistral_and_its_instruct_format(tmp_path):
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer, architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral")
    path = write_checkpoint(tmp_path / "llava-v1.6-mistral-tiny", config, original_weights(config), tokenizer)
    assert families.find(path) is llava_original
    model, processor = families.load(path)
    assert model.config.text_config.model_type == "mistral"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "[INST] <image>\nWhat is this? [/INST]"


# ---------------------------------------------------------------- VILA1.5's split layout

VILA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SIGLIP_SIZE, SIGLIP_PATCH = 28, 4  # 7 x 7 patches: odd, as so400m's 27 x 27 at 384 px


class DownSampleBlock(torch.nn.Module):
    """VILA1.5's llava/model/multimodal_projector/base_projector.py (May 2024), as written there."""

    def forward(self, x):
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, -1)
        n, w, h, c = x.size()
        if w % 2 == 1:
            x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
            n, w, h, c = x.size()
        if h % 2 == 1:
            x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
            n, w, h, c = x.size()
        x = x.view(n, w, int(h / 2), int(c * 2))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
        return x.reshape(x.shape[0], -1, x.shape[-1])


def vila_projector(vision: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        DownSampleBlock(),
        torch.nn.LayerNorm(vision * 4),
        torch.nn.Linear(vision * 4, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
    )


def write_vila15(directory: Path) -> Path:
    """VILA1.5-3b's layout: config.json naming ./llm, ./vision_tower (SigLIP), ./mm_projector."""
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tokenizer = llama_tokenizer()
    llm_config = llava_config(tokenizer)
    torch.manual_seed(11)
    lm = language_model(llm_config)
    with torch.no_grad():
        lm.lm_head.weight.mul_(20.0)
    lm.save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIGLIP_SIZE,
        patch_size=SIGLIP_PATCH,
    )
    SiglipVisionModel(vision).save_pretrained(directory / "vision_tower")
    preprocessor = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": SIGLIP_SIZE, "width": SIGLIP_SIZE},
    }
    (directory / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (directory / "mm_projector").mkdir()
    projector_config = {"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample"}
    (directory / "mm_projector" / "config.json").write_text(
        json.dumps({**projector_config, "model_type": "v2l_projector"})
    )
    projector = vila_projector(32, llm_config["hidden_size"])
    save_file(
        {f"layers.{k}": v.contiguous() for k, v in projector.state_dict().items()},
        str(directory / "mm_projector" / "model.safetensors"),
    )
    config = {
        "_name_or_path": "./vlm",
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "hidden_size": llm_config["hidden_size"],
        "mm_hidden_size": 32,
        "image_aspect_ratio": "resize",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_vision_select_feature": "cls_patch",
        "mm_vision_select_layer": -2,
        "model_dtype": "torch.bfloat16",
        "llm_cfg": {"_name_or_path": "./llm", "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        "vision_tower_cfg": {"_name_or_path": "./vision_tower", "architectures": ["SiglipVisionModel"]},
        "mm_projector_cfg": {"_name_or_path": "./mm_projector", **projector_config},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="module")
def vila15(store):
    return write_vila15(store["root"] / "VILA1.5-tiny")


def test_vila15_logits_equal_the_original_computation(vila15, photos):
    """SigLIP layer -2, all tokens (cls_patch), VILA's 2x2 merge with zero padding of the odd
    grid, LayerNorm/Linear/GELU/Linear, Llama; VILA's vicuna_v1 prompt."""
    from transformers import LlamaForCausalLM, SiglipVisionModel

    from ros2_nanovlm.engine.families import vila

    assert families.find(vila15) is vila
    frame = photos["dogs"]
    engine = engine_for(vila15)
    backend = engine._backend
    rendered, ids, features = prompt_of(engine, frame)
    assert rendered == f"{VILA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    assert len(features) == 16  # 7 x 7 patches -> padded 8 x 8 -> 4 x 4 merged tokens
    original_ids = tokenizer_image_token(rendered, llama_tokenizer())
    image_token_id = backend.prompter.image_token_id
    assert collapse_image(ids, image_token_id) == original_ids

    pixels = backend.encode_image._image_processor(images=frame, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (SIGLIP_SIZE, SIGLIP_SIZE)
    tower = SiglipVisionModel.from_pretrained(str(vila15 / "vision_tower")).eval()
    lm = LlamaForCausalLM.from_pretrained(str(vila15 / "llm")).eval()
    projector = vila_projector(32, 64)
    from safetensors.torch import load_file

    projector.load_state_dict(
        {k.removeprefix("layers."): v for k, v in load_file(str(vila15 / "mm_projector" / "model.safetensors")).items()}
    )
    with torch.inference_mode():
        image = projector(tower(pixels, output_hidden_states=True).hidden_states[-2])[0]
        at = original_ids.index(-200)
        embed = lm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(original_ids[:at])), image, embed(torch.tensor(original_ids[at + 1 :]))])
        reference = lm(inputs_embeds=embeds[None]).logits[0]
    assert torch.allclose(features, image, atol=1e-5)
    logits = spliced_logits(backend.model, ids, image_token_id, features)
    assert torch.allclose(logits, reference, atol=1e-4), (logits - reference).abs().max()
    answer = engine.ask("What is this?", frame, max_new_tokens=4)
    assert 1 <= len(answer.token_ids) <= 4


def test_vila15_missing_parts_are_named(vila15, tmp_path):
    import shutil

    broken = tmp_path / "VILA1.5-broken"
    shutil.copytree(vila15, broken)
    shutil.rmtree(broken / "vision_tower")
    with pytest.raises(ModelLoadError, match=r"vision_tower directory 'vision_tower/'"):
        families.load(broken)
    shutil.copytree(vila15 / "vision_tower", broken / "vision_tower")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(broken / "mm_projector" / "model.safetensors"))
    del weights["layers.4.weight"]
    save_file(weights, str(broken / "mm_projector" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lacks the projector weight layers\.4\.weight"):
        families.load(broken)


def test_the_first_vila_is_llava_layout_with_vilas_prompt(tmp_path):
    tokenizer = llama_tokenizer()
    config = llava_config(tokenizer, _name_or_path="Efficient-Large-Model/VILA-7b", image_aspect_ratio="resize")
    config["mm_vision_select_feature"] = "cls_patch"
    path = write_checkpoint(tmp_path / "VILA-7b-tiny", config, original_weights(config), tokenizer)
    from ros2_nanovlm.engine.families import vila

    assert families.find(path) is vila
    model, processor = families.load(path)
    assert model.config.vision_feature_select_strategy == "full"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"{VILA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    pixels = processor.image_processor(images=np.zeros((20, 40, 3), np.uint8), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)  # squashed, not cropped


def test_a_sentencepiece_tokenizer_model_as_llava_ships_it_loads_and_answers(tmp_path, photos):
    """liuhaotian/llava-v1.5-* ship only tokenizer.model (SentencePiece): it is read and converted
    to a fast tokenizer (the sentencepiece and protobuf packages), and the model answers."""
    import sentencepiece

    model_dir = tmp_path / "llava-v1.5-sentencepiece"
    model_dir.mkdir()
    sentences = ["USER: What is in the image? ASSISTANT: A dog on a lake.", "A chat between a curious human."] * 50
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(model_dir / "tokenizer"), vocab_size=300,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (model_dir / "tokenizer.vocab").unlink()
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    config = llava_config(llama_tokenizer())
    config["vocab_size"] = 300
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(model_dir, original_weights(config), safetensors=True)

    engine = VLMEngine.load(EngineConfig(model_path=str(model_dir), max_new_tokens=3))
    assert engine._backend.tokenizer.is_fast
    assert engine.ask("What is in the image?", photos["dogs"]).generated_tokens >= 1
