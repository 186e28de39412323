"""GPU memory over the node's model lifecycle, and the batched vision encoder on the GPU.

    python bench/cuda_lifecycle.py                      # on the GPU machine: tiny + LLaVA-1.5-7B
    python bench/cuda_lifecycle.py --quick --device cpu # smoke run: tiny model only, CUDA figures skipped

No ROS needed: the lifecycle goes through ros2_nanovlm/ros/model_slot.py's ModelSlot (no rclpy),
which is what the lifecycle node's configure (load) and cleanup (close) call on its worker.

1. Memory released at cleanup. For each model: ModelSlot.load(lambda: EngineConfig(...)), one
   engine.ask about a 640x480 photo, ModelSlot.close(); twice in a row for LLaVA-1.5-7B (random
   weights, real shapes, built with bench/archs.py and saved to --work-dir; the 4-bit fast path
   quantizes it at the first load and caches `<dir>.nanovlm-w4.safetensors`, which the second
   load reads), once for the tiny LLaVA. Recorded at before_load, after_load, after_answer,
   after_close: torch.cuda.memory_allocated, memory_reserved, and the driver's view
   (mem_get_info: total - free, which also counts the CUDA context, loaded kernels and any other
   process on the GPU). Checks, per cycle (reported, never asserted):
     allocated_back: after_close allocated <= before_load allocated + 64 MiB
     driver_back:    after_close driver used <= before_load driver used + 512 MiB (the context stays)
   and between the two 7B cycles (a leak grows from cycle to cycle): after_close of cycle 2
   within 64 MiB (allocated) and 128 MiB (driver) of cycle 1's.
   Diagnostics: which of backend / vision model / language model objects are still alive after
   close (weak references), the live tensors on the device after close (gc census), what a
   VLMEngine.close() alone frees while the caller still holds the engine and what the closed
   backend still reaches (in the last cycle of each model: ModelSlot.close() runs after it as usual),
   and, after the last cycle, what an extra empty_cache() (and cuBLAS workspace release) gives back.
2. The batched vision encoder (engine.prepare_images, GpuLlavaImageEncoder.encode_batch on CUDA):
   4 photos from data/images resized to 640x480 through backend.encode_image.encode_batch(frames)
   and through engine.prepare_images (the features it puts in the embedding cache), each against
   [backend.encode_image(f) for f in frames]; max/mean abs difference, cosine similarity, and
   the time of 4 frames batched against 4 single (CUDA-synchronised, median of --repeats after
   warm-up) for the 7B's CLIP ViT-L/336 tower (and the tiny one's). Runs in the 7B's second cycle,
   after its after_answer figures and before its close.

Writes bench/results/cuda-lifecycle-<GPU, e.g. H200>.json (cuda-lifecycle-cpu-smoke.json on the
CPU; do not commit that one) after every part, so a run cut short keeps what it measured, and
prints the figures. Each part runs in try/except: an error is recorded (text and traceback) in the
JSON and the run goes on; the exit status is 0 when the script ran to the end, whatever the checks.

Time on an H200 (fresh machine, no Triton cache), estimated from engine_bench's load figures (this
script has not run on a GPU yet): about 4 minutes, 6 at most: tiny model ~30 s
(first Triton compiles), building and saving the random 7B (14 GB fp16) ~1 min (skipped when
--work-dir already holds it), first 7B load with 4-bit quantization, cache write and CUDA-graph
capture ~1-1.5 min, second load from the 4-bit cache ~30 s, the vision comparison ~10 s.
Disk: 14 GB (fp16 model) + 4 GB (4-bit cache) under --work-dir (default /tmp/nanovlm-cuda-lifecycle).
"""

from __future__ import annotations

import argparse
import collections
import gc
import inspect
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import weakref
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ros2_nanovlm.engine import EngineConfig  # noqa: E402
from ros2_nanovlm.engine.frames import frame_digest  # noqa: E402
from ros2_nanovlm.ros.model_slot import ModelSlot  # noqa: E402

RESULTS = REPO / "bench" / "results"
PHOTOS = REPO / "data" / "images"
MIB = 2**20
ALLOCATED_TOLERANCE_MIB = 64
DRIVER_TOLERANCE_MIB = 512
CROSS_CYCLE_ALLOCATED_MIB = 64
CROSS_CYCLE_DRIVER_MIB = 128
FEATURE_TOLERANCE = 2e-2  # of the features' scale (see CRITERIA)
MIN_COSINE = 0.999
ARCH = "llava-1.5-7b"
QUESTION = "What is in the image? Answer in a few words."
ASK_PHOTO = "path.jpg"
VISION_PHOTOS = ("dogs.jpg", "fruit.jpg", "lake.jpg", "soccer.jpg")
FRAME_SIZE = (640, 480)  # width, height

CRITERIA = {
    "allocated_back": f"after close, torch.cuda.memory_allocated <= before load + {ALLOCATED_TOLERANCE_MIB} MiB "
    "(live tensors: weights, KV cache, graph buffers, embedding cache all gone; cuBLAS workspaces may stay)",
    "driver_back": f"after close, driver used (mem_get_info total - free) <= before load + {DRIVER_TOLERANCE_MIB} MiB "
    "(the CUDA context and loaded kernel modules stay; torch's cached but unused blocks count here)",
    "no_growth_across_cycles": f"after close of the second 7B cycle: allocated within {CROSS_CYCLE_ALLOCATED_MIB} MiB "
    f"and driver used within {CROSS_CYCLE_DRIVER_MIB} MiB of the first cycle's after close",
    "batched_vision_matches": f"per frame: same shape, max |batched - single| <= {FEATURE_TOLERANCE} x max |single| "
    f"(the features' scale), and cosine(batched, single) >= {MIN_COSINE}. In float16 the batched forward may "
    "use other GEMM kernels (tile shapes, split-K for 4x577 rows instead of 577) than the single one (a CUDA "
    "graph), so elements differ by a few float16 ulps of their magnitude, compounded over 23 CLIP layers and "
    "the projector: well under 2% of the largest feature. What this catches, a frame swapped, split at the "
    "wrong token, preprocessed differently or a CLS token kept, differs by the order of the scale itself "
    "(cosine far below 0.999).",
}


# ---- measurements ---------------------------------------------------------------------------


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory(device: torch.device) -> dict:
    """Memory figures now, in MiB (CUDA ones only on a CUDA device)."""
    figures = {"rss_mib": rss_mib()}
    if device.type != "cuda":
        figures["cuda"] = "skipped: not a CUDA device"
        return figures
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    figures.update(
        allocated_mib=torch.cuda.memory_allocated(device) / MIB,
        reserved_mib=torch.cuda.memory_reserved(device) / MIB,
        driver_used_mib=(total - free) / MIB,
        driver_total_mib=total / MIB,
    )
    return figures


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(function, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def live_tensors(device: torch.device, top: int = 8) -> dict:
    """Tensors on `device` that Python still reaches (gc census), by unique storage."""
    storages: dict[tuple, int] = {}
    shapes: collections.Counter = collections.Counter()
    count = 0
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != device.type:
                continue
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        except Exception:  # noqa: BLE001 - meta/sparse/fake tensors have no plain storage
            continue
        count += 1
        if key not in storages:
            storages[key] = storage.nbytes()
            shapes[f"{tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"] += storage.nbytes()
    return {
        "tensors": count,
        "storage_mib": sum(storages.values()) / MIB,
        "largest_by_shape_mib": {shape: nbytes / MIB for shape, nbytes in shapes.most_common(top)},
    }


def reachable_mib(obj, device: torch.device, depth: int = 4) -> tuple[float, list[str]]:
    """(MiB of tensors on `device` reachable from `obj` through attributes, containers and
    modules, CUDA graphs found on the way (their private pools are not counted))."""
    seen_storages: set[tuple] = set()
    seen_objects: set[int] = set()
    graphs: list[str] = []
    skipped = (str, bytes, int, float, bool, type(None), type, types.ModuleType, types.FunctionType,
               types.BuiltinFunctionType, np.ndarray)  # fmt: skip

    def tensor(t: torch.Tensor) -> int:
        if t.device.type != device.type:
            return 0
        try:
            storage = t.untyped_storage()
        except Exception:  # noqa: BLE001 - a tensor without plain storage holds nothing here
            return 0
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen_storages:
            return 0
        seen_storages.add(key)
        return storage.nbytes()

    def walk(value, path: str, depth: int) -> int:
        if isinstance(value, torch.Tensor):
            return tensor(value)
        if id(value) in seen_objects or isinstance(value, skipped) or len(seen_objects) > 200_000:
            return 0
        seen_objects.add(id(value))
        if device.type == "cuda" and isinstance(value, torch.cuda.CUDAGraph):
            graphs.append(path)
            return 0
        if isinstance(value, torch.nn.Module):
            return sum(tensor(t) for t in list(value.parameters()) + list(value.buffers()))
        if depth == 0:
            return 0
        if inspect.ismethod(value):  # a bound method keeps its object
            return walk(value.__self__, f"{path}.__self__", depth - 1)
        if isinstance(value, dict):
            return sum(walk(v, f"{path}[{k!r}]", depth - 1) for k, v in list(value.items()))
        if isinstance(value, (list, tuple, set, collections.deque)):
            return sum(walk(v, f"{path}[{i}]", depth - 1) for i, v in enumerate(list(value)))
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            return sum(walk(v, f"{path}.{k}", depth - 1) for k, v in list(attributes.items()))
        return 0

    return walk(obj, "backend", depth) / MIB, graphs


def held_by_backend(backend, device: torch.device) -> dict:
    """Per attribute of a (closed) backend: MiB on the device it still reaches."""
    held = {}
    for name, value in vars(backend).items():
        mib, graphs = reachable_mib(value, device)
        if mib or graphs:
            held[name] = {"type": type(value).__name__, "mib": mib}
            if graphs:
                held[name]["cuda_graphs"] = [path.replace("backend", name, 1) for path in graphs]
    return held


def growth(before: dict, after: dict, key: str, limit: float) -> dict:
    if key not in before or key not in after:
        return {"pass": None, "skipped": "no CUDA figures on this device"}
    delta = after[key] - before[key]
    return {"pass": delta <= limit, "growth_mib": delta, "limit_mib": limit}


# ---- inputs ---------------------------------------------------------------------------------


def load_frame(path: Path) -> np.ndarray:
    """RGB uint8 640x480: the photo centre-cropped to 4:3, then resized (opencv, else PIL)."""
    width, height = FRAME_SIZE
    try:
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image '{path}'")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    except ImportError:
        from PIL import Image

        rgb = np.asarray(Image.open(path).convert("RGB"))
    h, w = rgb.shape[:2]
    if w * height > h * width:  # too wide: crop the sides
        keep = h * width // height
        rgb = rgb[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    else:
        keep = w * height // width
        rgb = rgb[(h - keep) // 2 : (h - keep) // 2 + keep]
    try:
        import cv2

        return np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC)).copy()


def frames_for_run() -> tuple[np.ndarray, list[np.ndarray], dict]:
    """(frame to ask about, 4 frames for the vision check, where they came from)."""
    names = [ASK_PHOTO, *VISION_PHOTOS]
    try:
        frames = [load_frame(PHOTOS / name) for name in names]
        source = {"photos": names, "size": list(FRAME_SIZE)}
    except Exception as error:  # noqa: BLE001 - random frames still exercise every path
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (FRAME_SIZE[1], FRAME_SIZE[0], 3), dtype=np.uint8) for _ in names]
        source = {"photos": None, "random_frames_because": repr(error), "size": list(FRAME_SIZE)}
    return frames[0], frames[1:], source


def build_random_7b(model_dir: Path) -> dict:
    """Save the random-weight real-size LLaVA-1.5-7B of bench/archs.py (fp16) with its processor."""
    marker = model_dir / "NANOVLM_BENCH_COMPLETE"
    if marker.is_file():
        return {"model_dir": str(model_dir), "built": False, "reused": True}
    import archs

    if model_dir.exists():
        shutil.rmtree(model_dir)
    started = time.perf_counter()
    model, processor = archs.build(ARCH)
    built_s = time.perf_counter() - started
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    marker.write_text("random-weight LLaVA-1.5-7B (bench/archs.py), written by bench/cuda_lifecycle.py\n")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {
        "model_dir": str(model_dir),
        "built": True,
        "build_s": built_s,
        "build_and_save_s": time.perf_counter() - started,
        "safetensors_gb": size / 1e9,
    }


# ---- part 1: the lifecycle ------------------------------------------------------------------


def use_engine(slot: ModelSlot, frame: np.ndarray, device: torch.device, record: dict, extra) -> dict:
    """Answer once (and run `extra(engine)`), keeping no reference to the engine afterwards;
    returns weak references to what close() must free."""
    engine = slot.engine()
    backend = engine._backend
    refs = {"engine": weakref.ref(engine), "backend": weakref.ref(backend)}
    for name in ("model", "lm", "encode_image"):
        value = getattr(backend, name, None)
        if value is not None:
            refs[name] = weakref.ref(value)
    record["engine"] = {
        "model_name": engine.model_name,
        "device": engine.device,
        "quantization": getattr(backend, "quantization", None),
        "language_model": type(backend.lm).__name__,
        "vision_encoder": type(backend.encode_image).__name__,
    }
    started = time.perf_counter()
    answer = engine.ask(QUESTION, frame, max_new_tokens=8)
    record["answer"] = {
        "wall_ms": (time.perf_counter() - started) * 1000,
        "text": answer.text,
        "tokens": len(answer.token_ids),
        "prompt_tokens": answer.prompt_tokens,
        "timings_ms": vars(answer.timings).copy(),
    }
    record["memory"]["after_answer"] = memory(device)
    if extra is not None:
        extra(engine, record)
    return refs


def lifecycle_cycle(slot: ModelSlot, config, frame, device, *, extra=None, probe_close: bool = False) -> dict:
    """ModelSlot.load, one answer, ModelSlot.close: memory at each step, checks, diagnostics."""
    record: dict = {"memory": {"before_load": memory(device)}, "seconds": {}}
    started = time.perf_counter()
    loaded = slot.load(config)
    record["seconds"]["load"] = time.perf_counter() - started
    if not loaded:
        record["error"] = f"load failed: {slot.problem}"
        return record
    record["memory"]["after_load"] = memory(device)
    refs: dict = {}
    try:
        refs = use_engine(slot, frame, device, record, extra)
    except Exception:  # noqa: BLE001 - record it and still close: the next parts need the memory
        record["error"] = traceback.format_exc()
    if probe_close and slot.loaded is not None:
        try:
            probe_engine_close(slot.loaded, device, record)
        except Exception:  # noqa: BLE001 - a diagnostic only
            record["engine_close_probe_error"] = traceback.format_exc()
    started = time.perf_counter()
    slot.close()  # what the node's cleanup runs (on its worker)
    record["seconds"]["close"] = time.perf_counter() - started
    record["memory"]["after_close"] = memory(device)
    record["alive_after_close"] = {name: ref() is not None for name, ref in refs.items()}
    record["live_tensors_after_close"] = census = live_tensors(device)
    before, after = record["memory"]["before_load"], record["memory"]["after_close"]
    if "allocated_mib" in after:  # allocations no Python tensor holds: cuBLAS workspaces (one per stream seen)
        census["allocated_not_held_by_python_tensors_mib"] = after["allocated_mib"] - census["storage_mib"]
    record["checks"] = {
        "allocated_back": growth(before, after, "allocated_mib", ALLOCATED_TOLERANCE_MIB),
        "driver_back": growth(before, after, "driver_used_mib", DRIVER_TOLERANCE_MIB),
    }
    return record


def probe_engine_close(engine, device: torch.device, record: dict) -> None:
    """What VLMEngine.close() alone gives back while its caller still holds the engine (a user of
    the engine without ModelSlot), and what the closed backend still reaches. ModelSlot.close()
    then runs as usual (close() again is harmless), so the after_close figures are the node's."""
    engine.close()
    record["memory"]["after_engine_close_engine_still_referenced"] = memory(device)
    record["held_by_closed_backend"] = held_by_backend(engine._backend, device)


def extra_memory_release(device: torch.device) -> dict:
    """After the last cycle: what gc + cuBLAS workspaces + empty_cache() still give back (what
    ModelSlot.close() left in torch's cache)."""
    gc.collect()
    cleared = False
    if device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
        cleared = True
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"cublas_workspaces_cleared": cleared, "memory": memory(device), "live_tensors": live_tensors(device)}


# ---- part 2: batched vision -----------------------------------------------------------------


def compare(batched: list[torch.Tensor], single: list[torch.Tensor]) -> dict:
    frames = []
    ok = len(batched) == len(single)
    for ours, reference in zip(batched, single):
        same_shape = tuple(ours.shape) == tuple(reference.shape)
        entry = {"shape": list(reference.shape), "same_shape": same_shape}
        if same_shape:
            a, b = ours.float(), reference.float()
            scale = b.abs().max().item()
            diff = (a - b).abs()
            cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
            entry.update(
                max_abs_diff=diff.max().item(),
                mean_abs_diff=diff.mean().item(),
                scale_max_abs=scale,
                rms=b.pow(2).mean().sqrt().item(),
                max_abs_diff_over_scale=diff.max().item() / scale if scale else float("inf"),
                cosine=cosine,
            )
            entry["pass"] = entry["max_abs_diff"] <= FEATURE_TOLERANCE * scale and cosine >= MIN_COSINE
        else:
            entry["pass"] = False
        ok = ok and entry["pass"]
        frames.append(entry)
    return {"pass": ok, "frames": frames}


def vision_check(engine, record: dict, frames: list[np.ndarray], device: torch.device, repeats: int) -> None:
    """encode_batch and prepare_images against one frame at a time; timings. Into record["vision"]."""
    result: dict = {}
    record["vision"] = result
    try:
        backend = engine._backend
        encoder = backend.encode_image
        result["encoder"] = type(encoder).__name__
        result["frames"] = len(frames)
        with torch.inference_mode():
            single = [encoder(frame) for frame in frames]
            batched = encoder.encode_batch(frames)
        result["encode_batch_vs_single"] = compare(batched, single)
        encoded = engine.prepare_images(frames)
        result["prepare_images_encoded"] = encoded
        prepared = [backend.embeddings.get(frame_digest(frame)) for frame in frames]
        if any(features is None for features in prepared):
            result["prepare_images_vs_single"] = {"pass": False, "error": "a frame is missing from the embedding cache"}
        else:
            result["prepare_images_vs_single"] = compare(prepared, single)
        del single, batched, prepared
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                encoder.encode_batch(frames)
                result["batch_peak_extra_allocated_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
            batched_ms = median_ms(lambda: encoder.encode_batch(frames), device, repeats)
            single_ms = median_ms(lambda: [encoder(frame) for frame in frames], device, repeats)
        result["timing"] = {
            "repeats": repeats,
            "batched_ms": batched_ms,
            "single_ms": single_ms,
            "batched_ms_per_frame": batched_ms / len(frames),
            "single_ms_per_frame": single_ms / len(frames),
            "speedup": single_ms / batched_ms,
            "note": "640x480 uint8 frames to features, preprocessing included; single frames use the "
            "encoder's batch-1 path (a CUDA graph on the GPU fast path), the batch runs uncaptured",
        }
    except Exception:  # noqa: BLE001 - record it; the lifecycle part goes on to close
        result["error"] = traceback.format_exc()


# ---- the run --------------------------------------------------------------------------------


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device.type}-smoke"
    name = torch.cuda.get_device_name(device)
    parts = name.split()
    return parts[1] if len(parts) > 1 and parts[0] == "NVIDIA" else parts[0]


def summarise(results: dict) -> dict:
    checks = {}
    for model, part in results["models"].items():
        for index, cycle in enumerate(part.get("cycles", [])):
            for name, check in cycle.get("checks", {}).items():
                checks[f"{model}/cycle{index + 1}/{name}"] = check.get("pass")
            if "error" in cycle:
                checks[f"{model}/cycle{index + 1}/ran"] = False
            vision = cycle.get("vision")
            if vision is not None:
                for name in ("encode_batch_vs_single", "prepare_images_vs_single"):
                    checks[f"{model}/vision/{name}"] = vision.get(name, {}).get("pass", False)
        for name, check in part.get("cross_cycle_checks", {}).items():
            checks[f"{model}/{name}"] = check.get("pass")
        if "error" in part:
            checks[f"{model}/ran"] = False
    decided = [value for value in checks.values() if value is not None]
    return {
        "checks": checks,
        "all_pass": bool(decided) and all(decided),
        "skipped": sorted(k for k, v in checks.items() if v is None),
    }


def write(results: dict, path: Path) -> None:
    results["summary"] = summarise(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def print_cycle(label: str, cycle: dict) -> None:
    memory_rows = cycle.get("memory", {})
    print(f"  {label}: load {cycle['seconds'].get('load', float('nan')):.1f} s", flush=True)
    for step, figures in memory_rows.items():
        if "allocated_mib" in figures:
            print(
                f"    {step:<44} allocated {figures['allocated_mib']:9.1f}  reserved {figures['reserved_mib']:9.1f}"
                f"  driver used {figures['driver_used_mib']:9.1f} MiB   rss {figures['rss_mib']:8.1f}"
            )
        else:
            print(f"    {step:<44} rss {figures['rss_mib']:8.1f} MiB (no CUDA figures)")
    if "answer" in cycle:
        print(f"    answer: {cycle['answer']['text']!r} in {cycle['answer']['wall_ms']:.1f} ms")
    if "alive_after_close" in cycle:
        print(f"    alive after close: {cycle['alive_after_close']}")
        census = cycle["live_tensors_after_close"]
        print(f"    live tensors after close: {census['tensors']} ({census['storage_mib']:.1f} MiB)")
    if "held_by_closed_backend" in cycle:
        print(f"    a closed backend still held by its caller reaches: {cycle['held_by_closed_backend']}")
    for name, check in cycle.get("checks", {}).items():
        print(f"    check {name}: {check}")
    vision = cycle.get("vision")
    if vision:
        if "error" in vision:
            print(f"    vision ERROR: {vision['error'].strip().splitlines()[-1]}")
        for name in ("encode_batch_vs_single", "prepare_images_vs_single"):
            if name in vision:
                worst = max(
                    (f.get("max_abs_diff_over_scale", float("inf")) for f in vision[name].get("frames", [])),
                    default=float("nan"),
                )
                print(f"    vision {name}: pass={vision[name]['pass']} worst max|diff|/scale={worst:.2e}")
        if "timing" in vision:
            t = vision["timing"]
            print(
                f"    vision 4 frames: batched {t['batched_ms']:.2f} ms, single {t['single_ms']:.2f} ms "
                f"(x{t['speedup']:.2f})"
            )
    if "error" in cycle:
        print(f"    ERROR: {cycle['error'].strip().splitlines()[-1]}")


def run_model(results, key, out, slot, config, ask_frame, device, cycles, extra=None, probe_close=False):
    part = results["models"].setdefault(key, {})
    part.setdefault("cycles", [])
    for index in range(cycles):
        last = index == cycles - 1
        cycle = lifecycle_cycle(
            slot, config, ask_frame, device, extra=extra if last else None, probe_close=probe_close and last
        )
        part["cycles"].append(cycle)
        print_cycle(f"{key} cycle {index + 1}", cycle)
        write(results, out)
    part["after_last_close_then_empty_cache"] = extra_memory_release(device)
    memory_after = part["after_last_close_then_empty_cache"]["memory"]
    if "allocated_mib" in memory_after:
        print(
            f"  {key} after an extra empty_cache(): allocated {memory_after['allocated_mib']:.1f} "
            f"reserved {memory_after['reserved_mib']:.1f} driver used {memory_after['driver_used_mib']:.1f} MiB"
        )
    done = [c for c in part["cycles"] if "after_close" in c.get("memory", {})]
    if len(done) >= 2:
        first, second = done[0]["memory"]["after_close"], done[-1]["memory"]["after_close"]
        part["cross_cycle_checks"] = {
            "no_growth_allocated": growth(first, second, "allocated_mib", CROSS_CYCLE_ALLOCATED_MIB),
            "no_growth_driver": growth(first, second, "driver_used_mib", CROSS_CYCLE_DRIVER_MIB),
        }
        print(f"  {key} across cycles: {part['cross_cycle_checks']}")
    write(results, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only (smoke run)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: CUDA figures skipped)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of the vision encoder (median)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "nanovlm-cuda-lifecycle"),
                        help="where the random 7B is saved (and reused by a later run) with its 4-bit cache")  # fmt: skip
    parser.add_argument("--out", default="", help="results file (default bench/results/cuda-lifecycle-<GPU>.json)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    results: dict = {
        "script": "bench/cuda_lifecycle.py",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": vars(args),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "criteria": CRITERIA,
        "models": {},
    }
    try:
        results["triton"] = __import__("triton").__version__
    except ImportError:
        results["triton"] = None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            results["error"] = f"device '{args.device}' asked for, but CUDA is not available"
            out = Path(args.out) if args.out else RESULTS / "cuda-lifecycle-no-cuda.json"
            write(results, out)
            print(results["error"], f"\nwrote {out}")
            return 1
        torch.cuda.init()
        if device.index is None:  # "cuda": the current device, named by index for the figures
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        results["device"] = torch.cuda.get_device_name(device)
        results["note_driver_used"] = "driver used counts every process on the GPU; run on an otherwise idle GPU"
    else:
        results["device"] = platform.processor() or platform.machine()
    out = Path(args.out) if args.out else RESULTS / f"cuda-lifecycle-{device_tag(device)}.json"
    print(f"device {results['device']}; results to {out}", flush=True)
    memory(device)  # creates the CUDA context: it is part of every before_load figure
    ask_frame, vision_frames, source = frames_for_run()
    results["frames"] = source
    errors: list[str] = []
    slot = ModelSlot(errors.append)
    results["slot_errors"] = errors

    # The tiny LLaVA: a quick check of the same paths.
    tiny_dir = Path(tempfile.mkdtemp(prefix="nanovlm-lifecycle-tiny-"))
    try:
        from ros2_nanovlm.engine.tiny import build_tiny_llava

        print("== tiny LLaVA", flush=True)
        build_tiny_llava(tiny_dir / "tiny-llava")
        results["models"]["tiny-llava"] = {"model_dir": str(tiny_dir / "tiny-llava")}
        config = lambda: EngineConfig(model_path=str(tiny_dir / "tiny-llava"), device=args.device, max_new_tokens=8)  # noqa: E731
        run_model(results, "tiny-llava", out, slot, config, ask_frame, device, cycles=1, probe_close=True,
                  extra=lambda engine, record: vision_check(engine, record, vision_frames, device, args.repeats))  # fmt: skip
    except Exception:  # noqa: BLE001 - keep going to the 7B
        results["models"].setdefault("tiny-llava", {})["error"] = traceback.format_exc()
        print(results["models"]["tiny-llava"]["error"], flush=True)
    finally:
        slot.close()
        shutil.rmtree(tiny_dir, ignore_errors=True)
    write(results, out)

    if not args.quick:
        key = f"{ARCH}-random"
        part = results["models"].setdefault(key, {})
        try:
            if device.type != "cuda":
                raise RuntimeError("the real-size 7B runs on CUDA only (use --quick on the CPU)")
            print(f"== {ARCH} (random weights, real shapes)", flush=True)
            model_dir = Path(args.work_dir) / f"{ARCH}-random"
            part["build"] = build_random_7b(model_dir)
            print(f"  build: {part['build']}", flush=True)
            cache = model_dir.with_name(f"{model_dir.name}.nanovlm-w4.safetensors")
            part["w4_cache_existed_before_first_load"] = cache.is_file()
            write(results, out)
            config = lambda: EngineConfig(model_path=str(model_dir), device=args.device, max_new_tokens=8)  # noqa: E731
            run_model(results, key, out, slot, config, ask_frame, device, cycles=2, probe_close=True,
                      extra=lambda engine, record: vision_check(engine, record, vision_frames, device, args.repeats))  # fmt: skip
            part["w4_cache_file"] = str(cache) if cache.is_file() else None
        except Exception:  # noqa: BLE001 - record and finish the file
            part["error"] = traceback.format_exc()
            print(part["error"], flush=True)
        finally:
            slot.close()

    results["total_s"] = time.perf_counter() - started
    write(results, out)
    summary = results["summary"]
    print(f"checks: {json.dumps(summary['checks'], indent=1)}")
    print(f"all pass: {summary['all_pass']} (skipped: {summary['skipped']}); {results['total_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
