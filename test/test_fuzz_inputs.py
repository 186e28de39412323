"""Fuzzing what users and model directories hand the node, beyond images (test_fuzz_images.py):
prompts, parameter values, config.json of a model directory and the composed model's manifest.
The contract each time: the right answer or one clear error type, never another exception, and
the engine or node still works afterwards. Derandomized with fixed budgets: CI runs the same cases.
"""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ros2_nanovlm.engine import EngineConfig, EngineError, ModelLoadError, VLMEngine
from ros2_nanovlm.ros import parameters


def budget(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


CONTROL_TEXT = st.sampled_from(["<image>", "</s>", "<s>", "<|im_start|>", "<|im_end|>", "\x00", "\ud800", "USER:", "{"])
PROMPTS = st.lists(st.one_of(st.text(max_size=40), CONTROL_TEXT), max_size=12).map("".join)


@pytest.fixture(scope="module")
def engine(tiny_llava):
    return VLMEngine.load(EngineConfig(model_path=str(tiny_llava), max_new_tokens=2, max_prompt_tokens=64))


@budget(60)
@given(prompt=PROMPTS, system_prompt=st.one_of(st.just(""), PROMPTS))
def test_any_prompt_is_answered_or_refused_clearly(engine, photos, prompt, system_prompt):
    try:
        answer = engine.ask(prompt, photos["dogs"], system_prompt=system_prompt)
    except EngineError as error:
        assert str(error)
        return
    assert answer.generated_tokens >= 1


def test_the_engine_still_answers_after_the_prompt_fuzz(engine, photos):
    assert engine.ask("What is it?", photos["boxes"]).generated_tokens >= 1


def values_for(spec):
    if spec.string_array:
        return st.lists(st.text(max_size=20), max_size=5)
    if isinstance(spec.default, bool):
        return st.booleans()
    if isinstance(spec.default, int):
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if isinstance(spec.default, float):
        return st.floats(allow_nan=True, allow_infinity=True)
    return st.one_of(st.text(max_size=200), st.sampled_from(["/", "~", "~nobody/x", "/tmp/" + "a" * 300, "{", "[]"]))


@budget(400)
@given(data=st.data())
def test_every_parameter_value_gets_a_verdict_not_an_exception(data, engine):
    spec = data.draw(st.sampled_from(parameters.SPECS))
    value = data.draw(values_for(spec))
    count_tokens = data.draw(st.sampled_from([None, engine.count_tokens]))
    reason = parameters.check(spec.name, value, 512, count_tokens)
    assert isinstance(reason, str)
    assert len(reason) < 600  # user text is echoed cut


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 4096), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@budget(25)
@given(data=st.data())
def test_a_mangled_config_json_loads_or_fails_with_model_load_error(data, tiny_llava, tmp_path_factory, photos):
    directory = tmp_path_factory.mktemp("mangled") / "model"
    shutil.copytree(tiny_llava, directory)
    config = json.loads((directory / "config.json").read_text())
    section = data.draw(st.sampled_from([config, config["text_config"], config["vision_config"]]))
    key = data.draw(st.sampled_from(sorted(section)))
    section[key] = data.draw(JSON_VALUES)
    (directory / "config.json").write_text(json.dumps(config))
    try:
        engine = VLMEngine.load(EngineConfig(model_path=str(directory), max_new_tokens=2))
    except ModelLoadError as error:
        assert str(error)
        return
    try:
        engine.ask("What is it?", photos["dogs"])
    except EngineError as error:  # e.g. a changed image token: refused with a reason
        assert str(error)


@budget(15)
@given(data=st.data())
def test_a_mangled_composed_manifest_loads_or_fails_with_model_load_error(data, demo_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("manifest") / "model"
    directory.mkdir()
    for item in demo_model.iterdir():  # share the weights, own the manifest
        (directory / item.name).symlink_to(item)
    manifest_path = directory / "nanovlm_vlm.json"
    manifest_path.unlink()
    manifest = json.loads((demo_model / "nanovlm_vlm.json").read_text())
    target = data.draw(st.sampled_from([m for m in [manifest, *manifest.values()] if isinstance(m, dict)]))
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(st.one_of(JSON_VALUES, st.sampled_from(["../../etc/passwd", "/", "nanovlm_vlm.json"])))
    manifest_path.write_text(json.dumps(manifest))
    try:
        VLMEngine.load(EngineConfig(model_path=str(directory), max_new_tokens=2))
    except ModelLoadError as error:
        assert str(error)
