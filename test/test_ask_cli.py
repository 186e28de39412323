"""nanovlm-ask, the command-line client of the `query` service, run as a script runs it (a
subprocess, `python -m ros2_nanovlm.tools.ask`) against the node in its own process over real
ROS 2, with the embedded demo model: what it prints and the exit codes a script branches on.

One node serves every test (module scope): each start loads a model."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO
from ros_harness import NodeProcess, connected_client

from nanovlm.srv import Query
from ros2_nanovlm.ros.image_conversion import rgb_to_image_msg
from ros2_nanovlm.tools.image_file import read_image

NAMESPACE = "/ask"
NODE = f"{NAMESPACE}/nanovlm"
DOGS = REPO / "data" / "images" / "dogs.jpg"
# Bounds the CLI's own wait in the tests: the first question waits for the model to load.
CLI_TIMEOUT = "120"

# The demo model (SmolLM2-135M behind an ImageNet encoder) names objects; it cannot judge a
# yes/no question. Under the --yes-no schema it answered "yes" to all of the plain questions
# tried (20 questions, among them "Is there an elephant in the image?" and "Can dogs fly?", on
# the 9 test photos and a black and a white frame), and "no" only where the question itself
# spells that answer, which it copies. These two were found by trying, once, on the engine and
# then through the node. The answers are deterministic all the same: greedy decoding with fixed
# weights, the same image file and prompt, the same token mask; so they are fixtures of the exit
# codes, not claims about the model's judgement.
YES_PROMPT = "Is there a dog in the image?"
NO_PROMPT = 'Is there a cat in the image? The correct answer is {"answer":"no"}'


@pytest.fixture(scope="module")
def node(tmp_path_factory, demo_model):
    log = tmp_path_factory.mktemp("logs") / "ask-node.log"
    process = NodeProcess(NAMESPACE, log, f"model.path:={demo_model}", "rate:=0.0")
    with connected_client(process) as client:
        yield client


def ask(*args: str) -> subprocess.CompletedProcess:
    """The CLI's exit code, stdout and stderr (environment from conftest: this run's ROS domain)."""
    return subprocess.run(
        [sys.executable, "-m", "ros2_nanovlm.tools.ask", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_yes_exits_0(node):
    run = ask(YES_PROMPT, "--yes-no", "--image", str(DOGS), "--node", NODE, "--timeout", CLI_TIMEOUT)
    assert (run.returncode, run.stdout, run.stderr) == (0, "yes\n", "")


def test_no_exits_1_and_json_prints_the_compact_json(node):
    run = ask(NO_PROMPT, "--yes-no", "--json", "--image", str(DOGS), "--node", NODE, "--timeout", CLI_TIMEOUT)
    assert (run.returncode, run.stdout, run.stderr) == (1, '{"answer":"no"}\n', "")


def test_plain_mode_prints_the_answer_the_service_gives(node, tmp_path):
    """The same request sent by the test itself through the service: the same answer printed."""
    image = rgb_to_image_msg(read_image(DOGS), "rgb8")
    prompt = "What is in the image?"
    expected = node.query(prompt, image, max_new_tokens=16)
    assert expected.success, expected.error
    run = ask(prompt, "--image", str(DOGS), "--service", f"{NAMESPACE}/query", "--max-new-tokens", "16",
              "--timeout", CLI_TIMEOUT)  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (0, expected.answer + "\n", "")

    # --json with a schema file: read on the CLI's side, sent inline, the JSON printed as sent.
    schema = {"type": "object", "properties": {"subject": {"type": "string"}}, "required": ["subject"]}
    schema_file = tmp_path / "subject.json"
    schema_file.write_text(json.dumps(schema, indent=2))
    expected = node.query(prompt, image, max_new_tokens=24, json_schema=json.dumps(schema, separators=(",", ":")))
    assert expected.success and expected.json, expected.error
    run = ask(prompt, "--image", str(DOGS), "--json-schema", str(schema_file), "--json", "--node", NODE,
              "--max-new-tokens", "24", "--timeout", CLI_TIMEOUT)  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (0, expected.json + "\n", "")


def test_no_service_exits_2_within_the_timeout(node):
    """A service nobody serves: exit 2 after --timeout, not 1 ("no"), with the services that are there."""
    start = time.monotonic()
    run = ask(YES_PROMPT, "--yes-no", "--node", "/nowhere/nanovlm", "--timeout", "3")
    elapsed = time.monotonic() - start
    assert run.returncode == 2 and run.stdout == ""
    assert "service '/nowhere/query' not available within 3 s" in run.stderr, run.stderr
    assert f"{NAMESPACE}/query" in run.stderr, run.stderr  # the hint names the real one
    assert 3 <= elapsed < 3 + 15, elapsed  # 15: interpreter and rclpy start on a loaded machine


def test_no_answer_exits_2_within_the_timeout(node):
    """--timeout bounds the answer too: a server that takes the request and never replies (the
    test's own node, which does not spin while the CLI runs)."""
    node.node.create_service(Query, f"{NAMESPACE}/silent/query", lambda request, response: response)
    start = time.monotonic()
    run = ask(YES_PROMPT, "--yes-no", "--service", f"{NAMESPACE}/silent/query", "--timeout", "3")
    elapsed = time.monotonic() - start
    assert (run.returncode, run.stdout) == (2, "")
    assert "no answer within 3 s" in run.stderr, run.stderr
    assert 3 <= elapsed < 3 + 15, elapsed


def test_the_nodes_error_exits_2_with_its_reason(node):
    """Without --image the node answers about its camera's latest frame; none has arrived."""
    run = ask(YES_PROMPT, "--yes-no", "--node", NODE, "--timeout", CLI_TIMEOUT)
    assert (run.returncode, run.stdout) == (2, "")
    assert "the node answered with an error: no camera frame has arrived yet" in run.stderr, run.stderr


@pytest.mark.parametrize(
    "content, reason",
    [(b"not a picture", "is not an image opencv can decode"), (None, "no such file")],
    ids=["not-an-image", "missing"],
)
def test_unreadable_image_exits_2_before_asking(tmp_path, content, reason):
    """No node needed: the file is read before ROS starts, so the error is immediate."""
    path = tmp_path / "door.jpg"
    if content is not None:
        path.write_bytes(content)
    run = ask(YES_PROMPT, "--yes-no", "--image", str(path), "--service", "/nowhere/query", "--timeout", "30")
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith("nanovlm-ask: --image: ") and reason in run.stderr, run.stderr
    assert "not available" not in run.stderr


def test_bad_arguments_exit_2():
    run = ask(YES_PROMPT, "--yes-no", "--max-new-tokens", "8")
    assert run.returncode == 2 and "too small for --yes-no" in run.stderr, run.stderr
    run = ask(YES_PROMPT, "--service", "no such service", "--timeout", "30")
    assert run.returncode == 2 and "Invalid service name" in run.stderr, run.stderr
