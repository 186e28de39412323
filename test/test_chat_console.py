"""nanovlm-chat driven as a user drives it: the console runs in a pseudo-terminal (pexpect), keys
are typed into it and the test waits on what the screen shows. The tiny random LLaVA (answers
are noise, but fast) for the interaction; the embedded demo VLM for the images.json sequence,
whose answers must name each photo's subject.

prompt_toolkit asks the terminal for the cursor position (CPR) at each prompt; pexpect is a
terminal that does not answer, so PROMPT_TOOLKIT_NO_CPR=1 tells prompt_toolkit so up front
(otherwise it waits for the reply and prints a warning)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from subjects import names_subject

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PHOTOS = REPO / "data" / "images"
TIMEOUT = 120  # seconds any one expected output may take (model load on a busy 2-core machine)
PROMPT = ">> PROMPT:"  # prompt_toolkit moves the cursor over the trailing space instead of writing it
# One line of timings after each answer, e.g. [vision 12 ms | prefill 83 tokens 40 ms | decode 24 tokens 31.2 tok/s | eos]
STATS = re.compile(
    r"\[vision (\d+) ms \| prefill (\d+) tokens(?: \(\+(\d+) reused\))? (\d+) ms"
    r" \| decode (\d+) tokens ([\d.]+|-) tok/s \| (eos|max_new_tokens|context_full|cancelled)\]"
)
# The first visible character written after the Enter that ended the typed line: the newline,
# then only complete escape sequences (prompt_toolkit restoring the terminal), then the answer.
ANSWER_STARTS = r"\n(?:\x1b\[[0-9;?]*[A-Za-z])*[^\s\x1b]"
CTRL_C, BACKSPACE, UP = "\x03", "\x7f", "\x1b[A"


class ChatTerminal:
    """One nanovlm-chat process in a pseudo-terminal, typed into as a user types."""

    def __init__(self, *args: str):
        env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1")
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "ros2_nanovlm.tools.chat", *args],
            cwd=str(REPO),
            env=env,
            encoding="utf-8",
            timeout=TIMEOUT,
            dimensions=(50, 250),
        )

    def prompt(self) -> None:
        self.child.expect_exact(PROMPT)

    def type(self, keys: str) -> None:
        """Keys, then Enter (a terminal sends CR for it)."""
        self.child.send(keys + "\r")

    def expect(self, pattern: str) -> str:
        self.child.expect(pattern)
        return self.child.after

    def expect_exact(self, text: str) -> None:
        self.child.expect_exact(text)

    def stats(self) -> re.Match:
        return STATS.fullmatch(self.expect(STATS.pattern))

    def ask(self, question: str) -> re.Match:
        """At the prompt: type a question; its answer's stats line."""
        self.prompt()
        self.type(question)
        return self.stats()

    def exit_status(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def terminals():
    """Start consoles with terminals(*args); each is killed at the end if a test left it running."""
    started = []

    def start(*args: str) -> ChatTerminal:
        started.append(ChatTerminal(*args))
        return started[-1]

    yield start
    for terminal in started:
        terminal.kill()


def run_chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ros2_nanovlm.tools.chat", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_image_question_follow_up_reset_second_image(terminals, tiny_llava, tmp_path):
    transcript = tmp_path / "chat.json"
    chat = terminals(
        "--model", str(tiny_llava), "--device", "cpu", "--max-new-tokens", "8", "--transcript", str(transcript)
    )
    chat.prompt()
    chat.type(str(PHOTOS / "dogs.jpg"))
    chat.expect_exact("[image dogs.jpg 707x574: ask a question about it]")
    first = chat.ask("What is itx" + BACKSPACE + "?")  # a typo fixed with Backspace
    assert first.group(3) is None  # a new chat: nothing to reuse
    follow_up = chat.ask("And what colour is it?")
    assert int(follow_up.group(3)) >= int(first.group(2))  # the first prompt came from the KV cache
    chat.prompt()
    chat.type(UP + UP)  # history: the first question again
    assert chat.stats().group(7) in ("eos", "max_new_tokens")

    chat.prompt()
    chat.type(str(PHOTOS / "fruit.jpg"))  # a second image while the chat holds one
    chat.expect_exact("reads one image per chat: type reset, then the new image")
    chat.prompt()
    chat.type("reset")
    chat.expect_exact("[chat reset")
    chat.prompt()
    chat.type(str(PHOTOS / "fruit.jpg"))
    chat.expect_exact("[image fruit.jpg")
    second = chat.ask("What is it?")
    assert second.group(3) is None or int(second.group(3)) < int(first.group(2))  # the reset chat reused no turn
    chat.prompt()
    chat.type("/quit")
    assert chat.exit_status() == 0

    turns = json.loads(transcript.read_text())
    assert [(t["prompt"], Path(t["image"]).name, t["turn"]) for t in turns] == [
        ("What is it?", "dogs.jpg", 1),
        ("And what colour is it?", "dogs.jpg", 2),
        ("What is it?", "dogs.jpg", 3),
        ("What is it?", "fruit.jpg", 1),
    ]
    assert all(t["tokens"]["generated"] >= 1 and t["timings_ms"]["total"] > 0 for t in turns)


def test_ctrl_c_cancels_the_answer_not_the_program(terminals, tiny_llava):
    # 2000 new tokens: unstopped, the noise answer runs until the tiny model's context is full
    chat = terminals("--model", str(tiny_llava), "--device", "cpu", "--max-new-tokens", "2000")
    chat.prompt()
    chat.type(str(PHOTOS / "dogs.jpg"))
    chat.prompt()
    chat.type("Describe the image.")
    chat.expect_exact("Describe the image.")
    chat.expect(ANSWER_STARTS)  # the answer is streaming
    chat.child.send(CTRL_C)
    chat.expect_exact("[cancelled by Ctrl-C]")
    cancelled = chat.stats()
    assert cancelled.group(7) == "cancelled"
    assert int(cancelled.group(5)) < 500  # stopped early: the context holds ~1000 answer tokens
    # the program goes on: the next question gets an answer (the cancelled one is kept in the chat)
    after = chat.ask("Go on.")
    assert after.group(7) != "cancelled"
    assert int(after.group(3)) > 0
    chat.prompt()
    chat.child.sendeof()
    assert chat.exit_status() == 0


def test_bad_input_gets_a_clear_message_and_the_chat_goes_on(terminals, tiny_llava, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "noise.jpg").write_bytes(bytes(range(256)) * 8)  # not an image, whatever its name
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    # Unreadable: the tests run as root, whom permission bits do not stop, so a named pipe
    # (opening it would block until a writer comes: the console must refuse it unopened).
    os.mkfifo(tmp_path / "camera.jpg")
    bad = [
        (tmp_path / "missing.jpg", f"error: no such file: '{tmp_path / 'missing.jpg'}'"),
        (tmp_path / "gone.jpg", "is a broken symbolic link"),
        (tmp_path / "camera.jpg", "is a named pipe, not a regular file: it cannot be read as an image"),
        (tmp_path / "noise.jpg", "is not an image opencv can decode"),
        (tmp_path / "empty.png", "is empty, not an image"),
        (tmp_path / "photos", f"error: '{tmp_path / 'photos'}' is a directory, not an image"),
        ("/foo", "error: unknown command '/foo': type /help for the commands"),
        ("/json maybe", "error: /json takes on or off, not 'maybe'"),
    ]
    if os.geteuid() != 0:  # where permission bits do stop a read
        (tmp_path / "locked.jpg").write_bytes((PHOTOS / "dogs.jpg").read_bytes())
        (tmp_path / "locked.jpg").chmod(0)
        bad.append((tmp_path / "locked.jpg", "error: cannot read"))
    chat = terminals("--model", str(tiny_llava), "--device", "cpu", "--max-new-tokens", "4")
    for line, message in bad:
        chat.prompt()
        chat.type(str(line))
        chat.expect_exact(message)
    chat.prompt()
    chat.child.send("half a question")
    chat.child.send(CTRL_C)  # at the prompt: clears the line, as a shell does
    chat.prompt()
    chat.type("/help")
    chat.expect_exact("Commands:")
    chat.prompt()
    chat.type(str(PHOTOS / "soccer.jpg"))  # after all that, the chat still works
    chat.expect_exact("[image soccer.jpg")
    assert chat.ask("What is it?").group(7) in ("eos", "max_new_tokens")
    chat.prompt()
    chat.type("exit")
    assert chat.exit_status() == 0


def test_prompt_lines_and_a_text_file_run_in_order_then_exit(tiny_llava, tmp_path):
    script = tmp_path / "more.txt"
    script.write_text(f"# a comment\n\nreset\n{tmp_path / 'missing.jpg'}\n{PHOTOS / 'lake.jpg'}\nWhat now?\n/stats\n")
    transcript = tmp_path / "out.json"
    result = run_chat(
        *("--model", str(tiny_llava), "--device", "cpu", "--max-new-tokens", "4", "--transcript", str(transcript)),
        *("--prompt", str(PHOTOS / "dogs.jpg"), "--prompt", "What is it?", "--prompt", str(script)),
    )
    assert result.returncode == 1, result.stderr  # every line ran; 1 because one of them failed
    lines = [line for line in result.stdout.splitlines() if line.startswith(">> PROMPT: ")]
    assert lines == [
        f">> PROMPT: {PHOTOS / 'dogs.jpg'}",
        ">> PROMPT: What is it?",
        ">> PROMPT: reset",
        f">> PROMPT: {tmp_path / 'missing.jpg'}",
        f">> PROMPT: {PHOTOS / 'lake.jpg'}",
        ">> PROMPT: What now?",
        ">> PROMPT: /stats",
    ]
    assert "error: no such file" in result.stdout
    assert len(STATS.findall(result.stdout)) == 3  # two answers and /stats's last answer
    assert "this chat: 1 question, 1 image" in result.stdout
    turns = json.loads(transcript.read_text())
    assert [(t["prompt"], Path(t["image"]).name) for t in turns] == [
        ("What is it?", "dogs.jpg"),
        ("What now?", "lake.jpg"),
    ]


def test_bad_arguments_exit_2_with_a_message(tmp_path):
    missing_model = run_chat("--model", str(tmp_path / "no-model"), "--prompt", "hello")
    assert missing_model.returncode == 2
    assert f"cannot load the model: model path '{tmp_path / 'no-model'}' does not exist" in missing_model.stderr
    missing_file = run_chat("--prompt", str(tmp_path / "sequence.json"))
    assert missing_file.returncode == 2
    assert "cannot read prompt file" in missing_file.stderr
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    bad_file = run_chat("--prompt", str(tmp_path / "bad.json"))
    assert bad_file.returncode == 2
    assert "must hold a JSON list of strings" in bad_file.stderr
    bad_schema = run_chat("--json-schema", str(tmp_path / "schema.json"))
    assert bad_schema.returncode == 2
    assert "schema.json does not exist" in bad_schema.stderr


def test_json_schema_answers_are_json(tiny_llava, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"thing": {"type": "string"}}, "required": ["thing"]})
    )
    transcript = tmp_path / "out.json"
    result = run_chat(
        *("--model", str(tiny_llava), "--device", "cpu", "--max-new-tokens", "48", "--json-schema", str(schema)),
        *("--transcript", str(transcript), "--prompt", str(PHOTOS / "soccer.jpg"), "--prompt", "What is it?"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (turn,) = json.loads(transcript.read_text())
    assert turn["json_error"] == ""
    assert isinstance(turn["json"]["thing"], str)
    assert json.loads(turn["answer"]) == turn["json"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repository")
def test_images_json_sequence_end_to_end(demo_model, tmp_path):
    sequence = json.loads((SHARED_DATA / "prompts" / "images.json").read_text())
    transcript = tmp_path / "out.json"
    result = run_chat(
        *("--model", str(demo_model), "--device", "cpu", "--max-new-tokens", "32"),
        *("--prompt", str(SHARED_DATA / "prompts" / "images.json"), "--data-dir", str(SHARED_DATA)),
        *("--transcript", str(transcript)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    turns = json.loads(transcript.read_text())
    questions = [line for line in sequence if line != "reset" and not line.startswith("/data/")]
    assert [turn["prompt"] for turn in turns] == questions
    for turn in turns:
        assert Path(turn["image"]).parent == SHARED_DATA / "images"  # /data/... mapped by --data-dir
        assert turn["answer"].strip() and turn["stop_reason"] in ("eos", "max_new_tokens")
        assert turn["tokens"]["generated"] >= 1 and turn["timings_ms"]["total"] > 0
        if turn["turn"] == 1:  # the first question about each photo: the demo model names its subject
            assert names_subject(Path(turn["image"]).stem, turn["answer"]), turn
        else:  # follow-ups prefill only the new turn
            assert turn["tokens"]["reused"] > 0 and turn["timings_ms"]["vision"] == 0
    assert len(STATS.findall(result.stdout)) == len(questions)
