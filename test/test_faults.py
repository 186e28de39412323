"""Fault injection on the real node in its own process (test/faulty_node.py): an error deep in a
generation, out of memory, a model directory removed, corrupt or missing, the process stopped
and continued. Each fault reaches the caller and /diagnostics as a clear error, the node keeps
serving, and it recovers once the fault is gone."""

from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest
from ros_harness import REPO, NodeProcess, connected_client
from test_node import frame_msg, stamp_of

from nanovlm.srv import Query

FAULTY_NODE = [sys.executable, str(REPO / "test" / "faulty_node.py")]


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_llava):
    work = tmp_path_factory.mktemp("faults")
    fault_file = work / "fault"
    fault_file.write_text("")
    os.environ["NANOVLM_FAULT_FILE"] = str(fault_file)  # inherited by the node's process
    try:
        process = NodeProcess(
            "/faults", work / "node.log", f"model.path:={tiny_llava}", "rate:=0.0", "max_new_tokens:=6",
            command=FAULTY_NODE,
        )  # fmt: skip
    finally:
        del os.environ["NANOVLM_FAULT_FILE"]
    with connected_client(process) as client:
        client.wait_for_status(lambda status, values: values.get("model"))
        yield process, client, fault_file, work


def last_error_mentions(client, text):
    return client.wait_for_status(lambda status, values: text in values.get("last error", ""))


def test_an_error_deep_in_a_generation_reaches_caller_and_diagnostics_and_the_node_goes_on(faults, photos):
    _, client, fault_file, _ = faults
    fault_file.write_text("raise-mid-answer")
    response = client.query("What is it?", frame_msg(photos["dogs"]))
    assert not response.success
    assert "internal error" in response.error and "injected fault after 2 decode steps" in response.error
    last_error_mentions(client, "injected fault")
    # A camera frame meets the same fault: counted as rejected, the stream goes on.
    rejected_before = int(client.node_status()[1]["frames rejected"])
    client.publish(frame_msg(photos["fruit"]))
    client.wait_for_status(lambda status, values: int(values["frames rejected"]) > rejected_before)

    fault_file.write_text("")
    assert client.query("What is it?", frame_msg(photos["dogs"])).success
    frame = frame_msg(photos["lake"])
    client.publish(frame)
    client.wait_for_result(lambda result: stamp_of(result) == stamp_of(frame))


def test_out_of_memory_is_a_clear_error_and_the_model_stays_loaded(faults, photos):
    _, client, fault_file, _ = faults
    fault_file.write_text("oom")
    response = client.query("What is it?", frame_msg(photos["boxes"]))
    assert not response.success
    assert response.error.startswith("out of memory while answering") and "the model stays loaded" in response.error
    last_error_mentions(client, "out of memory")
    fault_file.write_text("")
    assert client.query("What is it?", frame_msg(photos["boxes"])).success


def test_a_model_directory_removed_corrupt_or_missing(faults, tiny_llava, photos):
    _, client, _, work = faults
    image = frame_msg(photos["path"])
    copy = work / "model-copy"
    shutil.copytree(tiny_llava, copy)
    assert client.set_parameter("model.path", str(copy)).successful
    client.wait_for_status(lambda status, values: values["model"] == "model-copy")
    # Removed while running: the weights are in memory; answers go on.
    shutil.rmtree(copy)
    assert client.query("Still there?", image).success

    corrupt = work / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{ this is not json")
    assert client.set_parameter("model.path", str(corrupt)).successful  # a directory with a config.json
    status, _ = client.wait_for_status(lambda status, values: status.level == status.ERROR)
    assert status.message.startswith("no model loaded:")
    response = client.query("Anyone?", image)
    assert not response.success and response.error.startswith("no model loaded:")

    missing = client.set_parameter("model.path", str(work / "gone"))
    assert not missing.successful and "is not an existing directory" in missing.reason

    assert client.set_parameter("model.path", str(tiny_llava)).successful
    client.wait_for_status(lambda status, values: values["model"] == tiny_llava.name)
    assert client.query("Back?", image).success


def test_stopped_and_continued_the_node_answers_what_came_meanwhile(faults, photos):
    process, client, _, _ = faults
    process.process.send_signal(signal.SIGSTOP)
    try:
        pending = client.query_client.call_async(
            Query.Request(prompt="While stopped?", image=frame_msg(photos["soccer"]))
        )
        frame = frame_msg(photos["flowers"])
        client.publish(frame)
        client.executor.spin_once(timeout_sec=0.5)
        assert not pending.done()  # nobody answers a stopped process
    finally:
        process.process.send_signal(signal.SIGCONT)
    response = client._await(pending)
    assert response.success
    later = frame_msg(photos["dogs_2"])
    client.publish(later)
    client.wait_for_result(lambda result: stamp_of(result) == stamp_of(later))
