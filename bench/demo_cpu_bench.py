"""CPU figures of the embedded demo VLM, and its answers on the test photographs.

    python bench/demo_cpu_bench.py [--seconds 30]

Writes bench/results/demo-cpu.json and .md: load time, vision ms, prefill ms, decode tok/s
(medians over the photos, after one warm-up answer), the answer to "What is in the image?" for
every photo with the encoder's own ImageNet top-1, and frames per second through the node
(camera at 10 Hz, node rate 0 = as fast as it goes) over real ROS 2 on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

RESULTS = REPO / "bench" / "results"
QUESTION = "What is in the image?"


def engine_figures() -> dict:
    import torch
    from subjects import SUBJECTS, names_subject

    from ros2_nanovlm.camera_player import load_photo
    from ros2_nanovlm.default_model import ensure_default_model
    from ros2_nanovlm.engine import EngineConfig, VLMEngine
    from ros2_nanovlm.engine.demo_model.efficientnet_lite import load_imagenet_classes, short_class_name

    started = time.perf_counter()
    model_path = ensure_default_model()
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    engine = VLMEngine.load(EngineConfig(model_path=str(model_path), max_new_tokens=24))
    load_s = time.perf_counter() - started
    classes = load_imagenet_classes(str(REPO / "ros2_nanovlm" / "engine" / "demo_model" / "imagenet_classes.txt"))
    encoder = engine._backend.encode_image
    photos = sorted((REPO / "data" / "images").glob("*.jpg"))
    engine.ask(QUESTION, load_photo(photos[0], 640))  # warm-up
    rows = []
    for path in photos:
        frame = load_photo(path, 640)
        answer = engine.ask(QUESTION, frame)
        from ros2_nanovlm.engine.demo_model.efficientnet_lite import preprocess_rgb

        with torch.inference_mode():
            logits = encoder._projector.class_logits(encoder._vision.forward_features(preprocess_rgb(frame)))
        top1 = int(logits.argmax())
        rows.append({
            "photo": path.name,
            "answer": answer.text,
            "names_subject": names_subject(path.stem, answer.text) if path.stem in SUBJECTS else None,
            "encoder_top1": short_class_name(classes[top1]),
            "vision_ms": answer.timings.vision_ms,
            "prefill_ms": answer.timings.prefill_ms,
            "prefilled_tokens": answer.prompt_tokens - answer.reused_tokens,
            "decode_ms": answer.timings.decode_ms,
            "generated_tokens": answer.generated_tokens,
            "total_ms": answer.timings.total_ms,
        })  # fmt: skip
    decode_tok_s = [(r["generated_tokens"] - 1) / (r["decode_ms"] / 1000) for r in rows if r["generated_tokens"] > 1]
    return {
        "model": str(model_path),
        "first_build_s": build_s,
        "load_s": load_s,
        "vision_ms": statistics.median(r["vision_ms"] for r in rows),
        "prefill_ms": statistics.median(r["prefill_ms"] for r in rows),
        "decode_tok_s": statistics.median(decode_tok_s),
        "answer_ms": statistics.median(r["total_ms"] for r in rows),
        "named_main_subject": f"{sum(bool(r['names_subject']) for r in rows)} of {sum(r['names_subject'] is not None for r in rows)} photos with an ImageNet-class subject",
        "answers": rows,
    }


def node_fps(seconds: float) -> dict:
    """Frames answered per second by the node process, fed 640 px frames at 10 Hz."""
    import rclpy

    os.environ["ROS_DOMAIN_ID"] = str(150 + os.getpid() % 50)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_large_images.xml")
    from ros2_nanovlm.default_model import ensure_default_model

    node = subprocess.Popen([sys.executable, "-m", "ros2_nanovlm.ros.node", "--ros-args", "--params-file", str(REPO / "config" / "vlm.yaml"),
                             "-p", f"model.path:={ensure_default_model()}", "-p", "rate:=0.0", "-p", "max_new_tokens:=24",
                             "-p", "prompt:=What is in the image?"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    rclpy.init()
    from nanovlm.msg import VLMResult
    from ros2_nanovlm.camera_player import CameraPlayer

    results = []
    listener = rclpy.create_node("fps_listener")
    listener.create_subscription(VLMResult, "result", lambda m: results.append((time.monotonic(), m)), 100)
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(listener)
    deadline = time.monotonic() + 120
    camera = None
    try:
        camera = CameraPlayer(parameter_overrides=[rclpy.parameter.Parameter("rate", value=10.0)])
        executor.add_node(camera)
        while not results and time.monotonic() < deadline:  # model loading
            executor.spin_once(timeout_sec=0.1)
        first = time.monotonic()
        count_before = len(results)
        while time.monotonic() - first < seconds:
            executor.spin_once(timeout_sec=0.05)
        answered = len(results) - count_before
        last = results[-1][1]
        return {
            "seconds": seconds, "camera_hz": 10.0, "frames_sent": camera.sent, "answers": answered,
            "frames_per_second": answered / seconds, "frames_dropped_reported": last.frames_dropped,
            "median_total_ms": statistics.median(m.total_ms for _, m in results[count_before:]),
        }  # fmt: skip
    finally:
        node.send_signal(2)
        node.wait(timeout=30)
        rclpy.try_shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    import torch

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "engine": engine_figures(),
        "node": node_fps(args.seconds),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo-cpu.json").write_text(json.dumps(report, indent=2))
    engine, node = report["engine"], report["node"]
    lines = [
        "# Demo VLM on the CPU", "",
        f"{report['machine']}; torch {report['torch']}. Model: EfficientNet-Lite0 -> projector -> SmolLM2-135M-Instruct.", "",
        f"- load {engine['load_s']:.1f} s (first assembly from the packages {engine['first_build_s']:.1f} s)",
        f"- vision {engine['vision_ms']:.1f} ms, prefill {engine['prefill_ms']:.1f} ms, decode {engine['decode_tok_s']:.1f} tok/s, "
        f"answer {engine['answer_ms']:.0f} ms (medians over the photos, 640 px frames)",
        f"- through the node over ROS 2: {node['frames_per_second']:.2f} frames/s answered "
        f"({node['answers']} answers in {node['seconds']:.0f} s, camera at {node['camera_hz']:.0f} Hz, "
        f"{node['frames_dropped_reported']} frames dropped and reported)",
        f"- names the main subject: {engine['named_main_subject']}", "",
        "| photo | answer | names the subject | encoder's ImageNet top-1 |", "|---|---|---|---|",
    ]  # fmt: skip
    for row in engine["answers"]:
        verdict = {True: "yes", False: "no", None: "(no ImageNet class for it)"}[row["names_subject"]]
        lines.append(f"| {row['photo']} | {row['answer']} | {verdict} | {row['encoder_top1']} |")
    (RESULTS / "demo-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
