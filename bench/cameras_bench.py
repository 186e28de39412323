"""Answers per second with 1, 2 and 4 cameras: the node in its own process with the demo model
at `rate: 0` (as fast as it goes) on this CPU, each camera publishing 640 px photos at 10 Hz over
real ROS 2.

    python bench/cameras_bench.py [--seconds 60] [--cameras 1,2,4]

One camera is the unnamed default (topic `image`); several are named cam0.. (`cam0/image`, ...).
Every frame differs from the last (a counter in its first pixels), as a camera's do, so no
answer comes from the embedding cache. Counted from the first answer of every camera for --seconds: answers in all and per camera, the
fairness (fewest / most per camera), the node's median frame-to-answer latency and the frames
it reported replaced. Writes bench/results/cameras-cpu.json. Run it on an idle machine: the
figures are the CPU's, and anything else running takes from them.
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
RESULTS = REPO / "bench" / "results"
CAMERA_HZ = 10.0
PROMPT = "What is in the image?"


def run(cameras: int, seconds: float, model_path: str) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from nanovlm.msg import VLMResult
    from ros2_nanovlm.camera_player import load_photo
    from ros2_nanovlm.ros.image_conversion import rgb_to_image_msg

    names = [""] if cameras == 1 else [f"cam{i}" for i in range(cameras)]
    namespace = f"/bench{cameras}"
    command = [
        sys.executable, "-m", "ros2_nanovlm.ros.node", "--ros-args",
        "--params-file", str(REPO / "config" / "vlm.yaml"), "-r", f"__ns:={namespace}",
        "-p", f"model.path:={model_path}", "-p", "rate:=0.0", "-p", "max_new_tokens:=24", "-p", f"prompt:={PROMPT}",
    ]  # fmt: skip
    if cameras > 1:
        command += ["-p", f"cameras:=[{', '.join(names)}]"]
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        client = rclpy.create_node("cameras_bench", namespace=namespace, context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(client)
        photos = [load_photo(path, 640) for path in sorted((REPO / "data" / "images").glob("*.jpg"))]
        frames = [rgb_to_image_msg(photo) for photo in photos]
        results: dict[str, list] = {name: [] for name in names}
        publishers = {}
        for index, name in enumerate(names):
            prefix = f"{name}/" if name else ""
            publishers[name] = client.create_publisher(Image, f"{prefix}image", qos_profile_sensor_data)
            client.create_subscription(
                VLMResult, f"{prefix}result", lambda m, n=name: results[n].append((time.monotonic(), m)), 100
            )
            step = [index]  # each camera starts at a different photo

            def publish(name=name, step=step, index=index):
                msg = frames[step[0] % len(frames)]
                msg.header.stamp = client.get_clock().now().to_msg()
                # A real camera never sends the same pixels twice: a counter in the first pixels
                # keeps the node's embedding cache from answering repeated photos for free.
                pixels = bytearray(msg.data)
                pixels[:8] = (step[0] * 16 + index).to_bytes(8, "little")
                msg.data = bytes(pixels)
                publishers[name].publish(msg)
                step[0] += 1

            client.create_timer(1.0 / CAMERA_HZ, publish)

        def spin_until(condition, timeout):
            deadline = time.monotonic() + timeout
            while not condition() and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.05)
            return condition()

        if not spin_until(lambda: all(results.values()), 300):
            raise RuntimeError(f"not every camera was answered: { {n: len(r) for n, r in results.items()} }")
        start = time.monotonic()
        counts_before = {name: len(r) for name, r in results.items()}
        spin_until(lambda: False, seconds)
        window = {name: [m for t, m in r[counts_before[name] :] if t >= start] for name, r in results.items()}
        per_camera = {name or "image": len(ms) for name, ms in window.items()}
        answered = [m for ms in window.values() for m in ms]
        return {
            "cameras": cameras,
            "answers": len(answered),
            "answers_per_second": round(len(answered) / seconds, 3),
            "per_camera": per_camera,
            "fairness_min_over_max": round(min(per_camera.values()) / max(max(per_camera.values()), 1), 3),
            "median_model_ms": round(statistics.median(m.total_ms for m in answered), 1) if answered else None,
            "median_vision_ms": round(statistics.median(m.vision_ms for m in answered), 1) if answered else None,
            "frames_dropped_reported": sum(ms[-1].frames_dropped for ms in window.values() if ms),
        }
    finally:
        node.send_signal(2)
        node.wait(timeout=30)
        rclpy.try_shutdown(context=context)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--cameras", default="1,2,4")
    args = parser.parse_args()
    os.environ["ROS_DOMAIN_ID"] = str(150 + os.getpid() % 50)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_large_images.xml")
    import torch

    from ros2_nanovlm.default_model import ensure_default_model

    model_path = str(ensure_default_model())
    runs = []
    for cameras in (int(n) for n in args.cameras.split(",")):
        figures = run(cameras, args.seconds, model_path)
        print(json.dumps(figures), flush=True)
        runs.append(figures)
    report = {
        "what": f"demo model, rate 0, max_new_tokens 24, each camera 640 px at {CAMERA_HZ:g} Hz, {args.seconds:g} s each",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cameras-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / 'cameras-cpu.json'}")


if __name__ == "__main__":
    main()
