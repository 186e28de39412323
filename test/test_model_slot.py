"""The node's model slot without ROS: any load failure leaves a clear state, never "loading";
a load replaces the old model; close frees it."""

from __future__ import annotations

import json

import pytest

from ros2_nanovlm.engine import EngineConfig
from ros2_nanovlm.ros.model_slot import ModelSlot, ModelUnavailable


def test_any_load_failure_is_reported_with_its_reason_and_not_as_loading(tmp_path):
    logged = []
    slot = ModelSlot(logged.append)
    # A composed manifest that is not what it should be raises deep inside the loader.
    (tmp_path / "nanovlm_vlm.json").write_text(json.dumps({"vision": 42}))
    assert not slot.load(lambda: EngineConfig(model_path=str(tmp_path)))
    assert not slot.loading and slot.problem.startswith("no model loaded: ")
    assert logged == [slot.problem]
    with pytest.raises(ModelUnavailable, match="no model loaded"):
        slot.engine()

    def broken_config():
        raise KeyError("model.device")

    assert not slot.load(broken_config)
    assert "model.device" in slot.problem and not slot.loading


def test_a_load_replaces_the_model_and_close_frees_it(tiny_llava):
    slot = ModelSlot(print)
    assert slot.load(lambda: EngineConfig(model_path=str(tiny_llava)))
    first = slot.engine()
    assert slot.load(lambda: EngineConfig(model_path=str(tiny_llava)))
    assert slot.engine() is not first and first._backend.model is None  # the old one was closed
    slot.close()
    assert slot.loaded is None and "freed" in slot.problem
    with pytest.raises(ModelUnavailable):
        slot.engine()
