"""Soak: the node under a robot's load for minutes, over real ROS 2, each party in its own process.

    python bench/soak.py [--minutes 10] [--warmup 60] [--clients 4] [--rate 1.0]

  camera   1920x1080 rgb8 at 30 Hz on `image` (every frame differs, as a camera's do: no answer
           comes from the embedding cache), stamped with the wall clock when sent
  clients  --clients processes, each calling the `query` service in a loop about the latest
           frame, no pause between calls (a behavior tree polling as fast as it is answered)
  goals    one process sending an `ask` action goal every --goal-every seconds
  node     the shipped node (`python -m ros2_nanovlm.ros.node`, config/vlm.yaml, the embedded
           demo model unless --model) at `rate` --rate

Measured after --warmup, over the rest of the run (all from this machine's wall clock):
  stream: answers/s against min(rate, half the model's answers/s): the share the README documents
          (requests and due camera frames take turns), frame age at answer (result received
          minus the frame's stamp) p50/p95/max, and that p95 in inference periods (the window's
          mean time per answer, streams and requests together);
  calls:  service latency p50/p95/max, answered / refused busy / timed out / other errors / lost
          (no reply at all, after a grace of query_timeout at the end); goals likewise;
  memory: the node's RSS at start (model loaded), after warm-up and at the end, and the growth
          after warm-up;
  frames: sent by the camera, and the node's own counts (received, answered, replaced by a newer
          one, rejected, lost before reaching it) from /diagnostics.
Writes bench/results/soak-cpu.json (or --out). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NAMESPACE = "/soak"
QUESTIONS = ["Is there a dog?", "What is in front of the robot?", "Is the path clear?", "What color is it?"]


# ---- the parties (each runs in its own process: --role) -------------------------------------


def ros_node(name: str):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init()
    node = rclpy.create_node(name, namespace=NAMESPACE)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    return rclpy, node, executor


def camera(until: float, report: Path, width: int, height: int, hz: float) -> None:
    from rclpy.executors import ExternalShutdownException
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image

    from ros2_nanovlm.resources import load_photo
    from ros2_nanovlm.ros.image_conversion import rgb_to_image_msg

    rclpy, node, executor = ros_node("soak_camera")
    import cv2

    photo = load_photo(REPO / "data" / "images" / "path.jpg", 640)
    msg = rgb_to_image_msg(cv2.resize(photo, (width, height)))
    # A camera driver in C++ costs its robot little per frame; a Python one serializing 6 MB at 30 Hz
    # would eat most of this machine's CPU and starve the node. So the frame is serialized once, and
    # each send patches its stamp (the header's first fields, right after the 4-byte CDR
    # encapsulation) and a counter in its last pixels (every frame differs), then publishes the bytes.
    frame = bytearray(serialize_message(msg))
    publisher = node.create_publisher(Image, "image", qos_profile_sensor_data)
    sent = [0]

    def publish():
        seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
        frame[4:12] = struct.pack("<iI", seconds, nanoseconds)
        frame[-8:] = sent[0].to_bytes(8, "little")
        publisher.publish(bytes(frame))
        sent[0] += 1

    node.create_timer(1.0 / hz, publish)
    try:
        while time.time() < until:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):  # the conductor's SIGINT: the run is over
        pass
    report.write_text(json.dumps({"sent": sent[0]}))
    rclpy.try_shutdown()


def client(until: float, report: Path, index: int, grace: float) -> None:
    from nanovlm.srv import Query

    rclpy, node, executor = ros_node(f"soak_client_{index}")
    query = node.create_client(Query, "query")
    query.wait_for_service(timeout_sec=60)
    calls = []
    while time.time() < until:
        sent = time.time()
        future = query.call_async(Query.Request(prompt=QUESTIONS[index % len(QUESTIONS)]))
        executor.spin_until_future_complete(future, timeout_sec=grace)
        if not future.done():
            calls.append({"sent": sent, "outcome": "lost"})
            query.remove_pending_request(future)
            continue
        response = future.result()
        outcome = "answered" if response.success else _kind(response.error)
        calls.append({"sent": sent, "latency_s": time.time() - sent, "outcome": outcome, "error": response.error})
    report.write_text(json.dumps(calls))
    rclpy.shutdown()


def goals(until: float, report: Path, every: float, grace: float) -> None:
    from rclpy.action import ActionClient

    from nanovlm.action import Ask

    rclpy, node, executor = ros_node("soak_goals")
    ask = ActionClient(node, Ask, "ask")
    ask.wait_for_server(timeout_sec=60)
    sent_goals = []
    while time.time() < until:
        sent = time.time()
        accepted = ask.send_goal_async(Ask.Goal(prompt="Describe what the robot sees."))
        executor.spin_until_future_complete(accepted, timeout_sec=grace)
        handle = accepted.result() if accepted.done() else None
        outcome, error = "lost", ""
        if handle is not None and handle.accepted:
            result = handle.get_result_async()
            executor.spin_until_future_complete(result, timeout_sec=grace)
            if result.done():
                error = result.result().result.error
                outcome = "answered" if result.result().result.success else _kind(error)
        sent_goals.append({"sent": sent, "latency_s": time.time() - sent, "outcome": outcome, "error": error})
        while time.time() < min(until, sent + every):
            executor.spin_once(timeout_sec=0.2)
    report.write_text(json.dumps(sent_goals))
    rclpy.shutdown()


def _kind(error: str) -> str:
    if error.startswith("busy"):
        return "busy"
    if error.startswith("no answer within query_timeout"):
        return "timeout"
    return "error"


# ---- the conductor ------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50": round(at(0.5), 3), "p95": round(at(0.95), 3), "max": round(ordered[-1], 3)}


def conduct(args) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from nanovlm.msg import VLMResult

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    command = [
        sys.executable, "-m", "ros2_nanovlm.ros.node", "--ros-args",
        "--params-file", str(REPO / "config" / "vlm.yaml"), "-r", f"__ns:={NAMESPACE}",
        "-p", f"rate:={args.rate}", "-p", f"max_pending_requests:={args.max_pending}",
    ]  # fmt: skip
    if args.model:
        command += ["-p", f"model.path:={args.model}"]
    node_log = open(work / "node.log", "w")  # noqa: SIM115 - the node's life
    node_process = subprocess.Popen(command, stdout=node_log, stderr=subprocess.STDOUT)
    rclpy.init()
    watcher = rclpy.create_node("soak_watcher", namespace=NAMESPACE)
    executor = SingleThreadedExecutor()
    executor.add_node(watcher)
    results: list[tuple[float, float, float]] = []  # (received, frame stamp, the model's total_ms)
    status: dict[str, str] = {}

    def on_result(msg):
        results.append((time.time(), msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, msg.total_ms))

    def on_diagnostics(array):
        for entry in array.status:
            if entry.name == "nanovlm: vlm":
                status.clear()
                status.update({kv.key: kv.value for kv in entry.values})

    watcher.create_subscription(VLMResult, "result", on_result, 100)
    watcher.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)

    def spin_for(seconds: float, condition=lambda: False) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline and not condition():
            executor.spin_once(timeout_sec=0.1)

    spin_for(600, lambda: bool(status.get("model")))
    if not status.get("model"):
        raise RuntimeError(f"the node never loaded its model; log: {work / 'node.log'}")
    rss = {"start_mb": rss_mb(node_process.pid)}
    camera_process = subprocess.Popen(
        [sys.executable, __file__, "--role", "camera", "--report", str(work / "camera.json"), "--grace", "0"]
        + ["--width", str(args.width), "--height", str(args.height), "--hz", str(args.hz), "--until", "inf"]
    )
    # The callers start once the camera is answered: before that they would only hear "no frame yet".
    spin_for(300, lambda: bool(results))
    if not results:
        raise RuntimeError(f"the camera was never answered; log: {work / 'node.log'}")
    started = time.time()
    until = started + args.warmup + args.minutes * 60
    grace = args.query_timeout + 10
    me = [sys.executable, __file__, "--until", str(until), "--grace", str(grace), "--goal-every", str(args.goal_every)]
    me += ["--width", str(args.width), "--height", str(args.height), "--hz", str(args.hz)]
    parties = [
        subprocess.Popen([*me, "--role", "goals", "--report", str(work / "goals.json")]),
        *(
            subprocess.Popen([*me, "--role", "client", "--index", str(i), "--report", str(work / f"client{i}.json")])
            for i in range(args.clients)
        ),
    ]
    rss_samples = []
    while time.time() < until:
        spin_for(5.0)
        rss_samples.append((time.time() - started, rss_mb(node_process.pid)))
        if time.time() - started >= args.warmup and "after_warmup_mb" not in rss:
            rss["after_warmup_mb"] = rss_samples[-1][1]
    for party in parties:  # clients finish their last call (the grace) before they report
        while party.poll() is None:
            spin_for(1.0)
    camera_process.send_signal(2)  # it writes its count on the way out
    camera_process.wait(timeout=30)
    spin_for(3.0)  # the last results and a fresh /diagnostics
    rss["end_mb"] = rss_mb(node_process.pid)
    node_status = dict(status)
    stopping = time.time()
    node_process.send_signal(2)
    node_process.wait(timeout=60)
    shutdown_s = time.time() - stopping
    rclpy.shutdown()

    measured_from = started + args.warmup
    window = until - measured_from
    calls = [c for i in range(args.clients) for c in json.loads((work / f"client{i}.json").read_text())]
    goal_list = json.loads((work / "goals.json").read_text())
    camera_report = json.loads((work / "camera.json").read_text())
    stream = [(received, stamp) for received, stamp, _ in results if received >= measured_from]
    model_ms = [total_ms for received, _, total_ms in results if received >= measured_from]
    in_window = [c for c in calls + goal_list if c["sent"] >= measured_from]
    requests_answered = sum(c["outcome"] == "answered" for c in in_window)
    model_answers_per_s = (len(stream) + requests_answered) / window
    period_s = 1.0 / model_answers_per_s if model_answers_per_s else float("inf")
    ages = [received - stamp for received, stamp in stream]
    expected_stream = min(args.rate, model_answers_per_s / 2) if args.rate else model_answers_per_s / 2
    stream_per_s = len(stream) / window

    def outcomes(items):
        counts = dict.fromkeys(("answered", "busy", "timeout", "error", "lost"), 0)
        for item in items:
            counts[item["outcome"]] += 1
        return counts

    growth = (rss["end_mb"] - rss["after_warmup_mb"]) / rss["after_warmup_mb"]
    age_p95_periods = percentiles(ages).get("p95", float("inf")) / period_s
    return {
        "what": (
            f"{args.width}x{args.height} rgb8 at {args.hz:g} Hz, {args.clients} query clients in a loop, an Ask goal "
            f"every {args.goal_every:g} s; node rate {args.rate:g}, {args.minutes:g} min measured after {args.warmup:g} s"
        ),
        "model": node_status.get("model"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "stream": {
            "answers": len(stream),
            "answers_per_s": round(stream_per_s, 3),
            "expected_per_s": round(expected_stream, 3),
            "within_10_percent": abs(stream_per_s - expected_stream) <= 0.1 * expected_stream,
            "frame_age_s": percentiles(ages),
            "inference_period_s": round(period_s, 3),
            "model_ms_per_frame": percentiles(model_ms),
            "frame_age_p95_in_periods": round(age_p95_periods, 2),
        },
        "model_answers_per_s": round(model_answers_per_s, 3),
        "service": {
            "calls": outcomes(calls),
            "latency_s": percentiles([c["latency_s"] for c in calls if "latency_s" in c]),
        },
        "goals": {"sent": outcomes(goal_list), "latency_s": percentiles([g["latency_s"] for g in goal_list])},
        "lost_requests": outcomes(calls)["lost"] + outcomes(goal_list)["lost"],
        "rss": {**{k: round(v, 1) for k, v in rss.items()}, "growth_after_warmup": round(growth, 4)},
        "rss_samples": [(round(t), round(mb, 1)) for t, mb in rss_samples],
        "frames": {
            "sent": camera_report["sent"],
            **{
                key: int(node_status.get(f"frames {key}", 0))
                for key in ("received", "answered", "replaced", "rejected", "lost")
            },
        },
        "checks": {
            "no_lost_requests": outcomes(calls)["lost"] + outcomes(goal_list)["lost"] == 0,
            "stream_within_10_percent": abs(stream_per_s - expected_stream) <= 0.1 * expected_stream,
            "rss_growth_at_most_5_percent": growth <= 0.05,
            "frame_age_p95_at_most_2_periods": age_p95_periods <= 2.0,
        },
        "shutdown_s_after_sigint": round(shutdown_s, 2),
        "node_exit_code": node_process.returncode,
        "node_log": str(work / "node.log"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--hz", type=float, default=30.0)
    parser.add_argument("--goal-every", type=float, default=20.0)
    parser.add_argument("--max-pending", type=int, default=8)
    parser.add_argument("--query-timeout", type=float, default=60.0)
    parser.add_argument("--model", default="", help="model directory (default: the embedded demo model)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "soak-cpu.json"))
    # the parties' own options
    parser.add_argument("--role", choices=["camera", "client", "goals"])
    parser.add_argument("--until", type=float)
    parser.add_argument("--grace", type=float)
    parser.add_argument("--report")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()
    if args.role == "camera":
        camera(args.until, Path(args.report), args.width, args.height, args.hz)
        return
    if args.role == "client":
        client(args.until, Path(args.report), args.index, args.grace)
        return
    if args.role == "goals":
        goals(args.until, Path(args.report), args.goal_every, args.grace)
        return
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_large_images.xml")
    report = conduct(args)
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
