"""The generation loop on real models (tiny random LLaVAs and the demo VLM, CPU): streamed text,
cancel, token masks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ros2_nanovlm.engine import EngineConfig, VLMEngine
from ros2_nanovlm.engine.api import GenerationControl, Turn
from ros2_nanovlm.engine.generation import TextStream
from ros2_nanovlm.engine.token_mask import allowed_tokens, words_allowing

MODELS = ["llava", "llava_stablelm", "demo"]


@pytest.fixture(params=MODELS)
def engine(request, tiny_llava, tiny_llava_stablelm, demo_model):
    path = {"llava": tiny_llava, "llava_stablelm": tiny_llava_stablelm, "demo": demo_model}[request.param]
    return VLMEngine.load(EngineConfig(model_path=str(path), device="cpu", max_new_tokens=40))


def decoded(engine, answer) -> str:
    return engine._backend.tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()


def test_streamed_pieces_join_to_the_answer_and_arrive_while_it_is_generated(engine, photos):
    pieces, tokens_so_far = [], []
    backend = engine._backend
    decode_step = backend.lm.decode_step

    def counting_step(*args, **kwargs):  # how many tokens exist when each piece arrives
        counting_step.calls += 1
        return decode_step(*args, **kwargs)

    counting_step.calls = 0
    backend.lm.decode_step = counting_step

    def on_token(piece):
        pieces.append(piece)
        tokens_so_far.append(counting_step.calls + 1)

    answer = engine.ask("Describe the image.", photos["fruit"], max_new_tokens=40, on_token=on_token)
    assert answer.generated_tokens >= 3
    assert "".join(pieces) == answer.text == decoded(engine, answer)
    assert all(pieces), "an empty piece was handed out"
    # The first piece came with the first tokens, long before the last one.
    assert tokens_so_far[0] < answer.generated_tokens


def test_the_iterator_form_yields_the_same_pieces(engine, photos):
    chat = engine.chat()
    stream = chat.stream("What is in the image?", photos["dogs"], max_new_tokens=24)
    pieces = list(stream)
    assert "".join(pieces) == stream.answer.text
    again = engine.ask("What is in the image?", photos["dogs"], max_new_tokens=24)
    assert again.token_ids == stream.answer.token_ids


def test_cancel_during_decode_stops_within_one_token_and_the_next_answer_is_right(engine, photos):
    chat = engine.chat("You are a robot's eyes.")
    cancel = threading.Event()
    seen = []

    def on_token(piece):
        seen.append(piece)
        if len(seen) == 2:
            cancel.set()
            seen.append(len(engine._backend.kv))  # KV entries when the cancel came

    answer = chat.ask(
        "Describe everything in the image.", photos["lake"], max_new_tokens=500, on_token=on_token, cancel=cancel
    )
    assert answer.stop_reason == "cancelled"
    kv_at_cancel = seen[2]
    # Within one token: after the cancel the loop fed at most the token in hand.
    assert len(engine._backend.kv) <= kv_at_cancel + 1
    assert chat.history[-1].text == answer.text  # the partial answer is the assistant's turn

    follow_up = chat.ask("Is it safe to walk there?", max_new_tokens=12)
    fresh = VLMEngine.load(engine.config)
    replay = fresh._answer(chat.system_prompt, chat.history[:-1], 12, None)
    assert follow_up.reused_tokens > 0
    assert follow_up.token_ids == replay.token_ids, "the KV cache after the cancel changed the next answer"


def test_leaving_a_stream_early_cancels_the_answer(engine, photos):
    stream = engine.chat().stream("Describe the image.", photos["boxes"], max_new_tokens=500)
    for _ in stream:
        break
    assert stream.answer.stop_reason in ("cancelled", "eos")
    assert stream.answer.generated_tokens < 500


class ForcedSequence:
    """A constraint allowing exactly one token at each step: `tokens`, then the stop token."""

    def __init__(self, tokens: list[int], stop: int, vocab_size: int):
        self._tokens, self._stop, self._vocab = tokens, stop, vocab_size
        self.accepted: list[int] = []
        self.masks: list[np.ndarray] = []

    def fill_mask(self, out, tokens_left):
        index = len(self.accepted)
        out[:] = words_allowing([self._tokens[index] if index < len(self._tokens) else self._stop], self._vocab)
        self.masks.append(out.copy())

    def accept(self, token):
        assert allowed_tokens(self.masks[-1], self._vocab).tolist() == [token]
        self.accepted.append(token)

    def is_finished(self):
        return len(self.accepted) == len(self._tokens)


def test_a_token_mask_that_forces_a_sequence_produces_it(engine, photos):
    backend = engine._backend
    wanted = backend.tokenizer("The door is open.", add_special_tokens=False)["input_ids"]
    stop = next(iter(backend.eos_ids))
    constraint = ForcedSequence(wanted, stop, backend.lm.vocab_size)
    control = GenerationControl(constraint=constraint)
    answer = engine._answer("", (Turn("user", "Hi?", photos["path"]),), 30, None, control)
    assert answer.token_ids == wanted and answer.text == "The door is open."
    assert answer.stop_reason == "eos"
    # The mask is gone afterwards: the next answer is the unconstrained one again.
    free = engine.ask("Hi?", photos["path"], max_new_tokens=8)
    assert free.token_ids == VLMEngine.load(engine.config).ask("Hi?", photos["path"], max_new_tokens=8).token_ids


@pytest.mark.parametrize("model", ["llava", "demo"])
def test_text_stream_never_splits_a_character(model, tiny_llava, demo_model):
    from transformers import AutoProcessor, AutoTokenizer

    if model == "llava":
        tokenizer = AutoProcessor.from_pretrained(tiny_llava).tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(demo_model / "language_model")
    text = "  Ein Schild: «Hoover Dam» → 1½ mile, 日本語 🐕 ok.  "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == text.strip() == stream.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(bool(piece) for piece in pieces) > 5  # streamed, not all at the end
