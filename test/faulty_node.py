"""The real nanovlm node, with faults injected on command, for test_faults.py.

The test writes a fault's name into the file named by $NANOVLM_FAULT_FILE; every answer that
starts while it is there meets the fault, and an empty file ends it:
  raise-mid-answer  the generation raises after its second decode step (a bug deep in a backend)
  oom               the generation raises torch's OutOfMemoryError before the first token
Everything else is the node as shipped: same entry point, parameters, model and ROS graph.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ros2_nanovlm.engine.api import GenerationControl
from ros2_nanovlm.engine.hf.backend import TransformersBackend
from ros2_nanovlm.ros.node import main

FAULT_FILE = Path(os.environ["NANOVLM_FAULT_FILE"])
_generate = TransformersBackend.generate


def _fault() -> str:
    return FAULT_FILE.read_text().strip() if FAULT_FILE.exists() else ""


def _raising_after(steps: int, control: GenerationControl | None) -> GenerationControl:
    control = control or GenerationControl()
    polls = [0]
    should_stop = control.should_stop

    def poll() -> bool:
        polls[0] += 1
        if polls[0] > steps:
            raise RuntimeError(f"injected fault after {steps} decode steps")
        return bool(should_stop and should_stop())

    return dataclasses.replace(control, should_stop=poll)


def generate(self, request, control=None):
    fault = _fault()
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    if fault == "raise-mid-answer":
        control = _raising_after(2, control)
    return _generate(self, request, control)


TransformersBackend.generate = generate

if __name__ == "__main__":
    main()
