"""``load_model`` time over many loads in a process that holds what a real one holds (diffusers
and transformers imported), to show the pauses a full garbage collection adds to some loads.

CPU only: ``python benchmarks/load_pauses.py [--loads 40] [--tensors 582]``. A file of
``--tensors`` small Q4_K matrices (the tensor count of an 8 GiB Wan-14B-like file: the Python
work per tensor is what is timed, not the bytes) is loaded ``--loads`` times into a fresh
meta-device model; prints min / median / max milliseconds, how many objects the collector
tracks, and the full (generation 2) collections that ran inside loads with what each cost.
``--gc-off`` disables the collector around each load here, as a reference.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch
from torch import nn

import ggufvideo
from ggufvideo import GGMLTensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loads", type=int, default=40)
    ap.add_argument("--tensors", type=int, default=582)
    ap.add_argument("--gc-off", action="store_true", help="disable the collector around loads")
    ap.add_argument("--keep", action="store_true",
                    help="keep every loaded model alive (a process that holds what it loads)")
    args = ap.parse_args()
    try:  # what a real process holds: thousands of classes, functions and modules
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import WanTransformer3DModel  # noqa: F401
    except ImportError as e:
        print(f"# without diffusers/transformers ({e}): fewer objects, shorter pauses")
    n = args.tensors

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.ModuleList(nn.Linear(256, 256, bias=False) for _ in range(n))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small.gguf")
        raw = torch.randint(0, 255, (256, 144), dtype=torch.uint8)
        ggufvideo.save_state_dict({f"l.{i}.weight": GGMLTensor(raw, "Q4_K", (256, 256))
                                   for i in range(n)}, path)
        kept: list[nn.Module] = []
        times: list[float] = []
        full: list[float] = []  # ms of each full collection that ran inside a load
        started = [0.0]

        def watch(phase: str, info: dict[str, int]) -> None:
            if info["generation"] == 2:
                if phase == "start":
                    started[0] = time.perf_counter()
                else:
                    full.append((time.perf_counter() - started[0]) * 1e3)

        for _ in range(args.loads):
            with ggufvideo.empty_weights():
                model = Net()
            if args.gc_off:
                gc.disable()
            gc.callbacks.append(watch)
            t0 = time.perf_counter()
            ggufvideo.load_model(model, path, device="cpu")
            times.append((time.perf_counter() - t0) * 1e3)
            gc.callbacks.remove(watch)
            if args.gc_off:
                gc.enable()
            if args.keep:
                kept.append(model)
            del model
    times.sort()
    print(f"{n} tensors, {args.loads} loads, {len(gc.get_objects())} tracked objects: "
          f"min {times[0]:.1f} median {times[len(times) // 2]:.1f} max {times[-1]:.1f} ms; "
          f"{len(full)} full collection(s) inside loads: {[round(t) for t in full]} ms")
    t0 = time.perf_counter()
    gc.collect()
    print(f"one full collection of this process: {(time.perf_counter() - t0) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
