"""Peak resident memory of ``ggufvideo.convert`` for each kind of source.

Writes one synthetic float32 model (``--tensors`` tensors of ``--rows`` x ``--cols``, 8 MiB each by
default, ~200 MiB in all) as a ``.safetensors`` file, a ``.pt`` state dict and an F32 ``.gguf``,
then converts each in a fresh process and prints that process's peak RSS above its baseline (taken
after imports), next to the source's size. Peak RSS is read as ``VmHWM`` (the kernel's high-water
mark of this address space, reset after imports through ``/proc/self/clear_refs``), not
``ru_maxrss``: a child's ``ru_maxrss`` starts at its parent's RSS at fork time. The converter
promises memory of about the largest tensor times a small factor, never the model: the
"peak - base" column should stay near a few tensors whatever the file size.

Usage::

    python benchmarks/convert_memory.py                    # Q8_0, 25 tensors of 8 MiB
    python benchmarks/convert_memory.py --qtype Q4_K --tensors 50

Linux only (``/proc/self/status``). The CPU and page cache may be shared with other processes;
memory numbers do not depend on that, timings do.

Measured (2-core shared CPU VM, 24 GiB RAM, Linux ext4, torch 2.13 CPU; 8 MiB tensors; the
script's seconds column is wall-clock on a CPU shared with other jobs, so it is left out)::

    before releasing consumed pages (a map kept every page it touched resident), Q8_0, 25 tensors:
    source        file MiB  base MiB  peak MiB  peak-base MiB
    safetensors      200.0     224.0     254.8           30.9
    torch            200.0     224.1     455.8          231.8
    gguf             200.0     224.0     462.6          238.7

    after (.pt: consumed storages released with madvise(MADV_DONTNEED); .gguf: plain reads):
    Q8_0, 25 tensors (200 MiB)
    safetensors      200.0     224.4     270.7           46.3
    torch            200.0     224.4     270.3           45.9
    gguf             200.0     224.4     271.7           47.3
    Q8_0, 50 tensors (400 MiB): the peak does not grow with the model
    safetensors      400.0     224.4     255.9           31.5
    torch            400.0     224.4     270.5           46.1
    gguf             400.0     224.5     267.9           43.4
    Q4_K, 25 tensors (the K-quant search's temporaries for one 1M-element chunk on top)
    safetensors      200.0     224.5     269.7           45.1
    torch            200.0     224.4     285.2           60.9
    gguf             200.0     224.4     280.7           56.3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import torch
import ggufvideo
from ggufvideo.convert import convert

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

src, dst, qtype = sys.argv[1:4]
try:  # start the high-water mark at the current RSS (Linux >= 4.0), past import-time spikes
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status_kib("VmRSS")
t0 = time.perf_counter()
summary = convert(src, dst, qtype=qtype, force=True)
seconds = time.perf_counter() - t0
print(json.dumps({"base_kib": base, "peak_kib": status_kib("VmHWM"), "seconds": seconds,
                  "bytes_out": summary.bytes_out}))
"""


def write_sources(folder: str, n_tensors: int, rows: int, cols: int, seed: int = 0
                  ) -> dict[str, str]:
    """Write the same float32 model as .safetensors, .pt and .gguf; returns kind -> path."""
    import torch
    from safetensors.torch import save_file

    from ggufvideo import save_state_dict

    g = torch.Generator().manual_seed(seed)
    sd = {f"blocks.{i}.linear.weight": torch.randn(rows, cols, generator=g)
          for i in range(n_tensors)}
    paths = {"safetensors": os.path.join(folder, "model.safetensors"),
             "torch": os.path.join(folder, "model.pt"),
             "gguf": os.path.join(folder, "model.gguf")}
    save_file(sd, paths["safetensors"])
    torch.save(sd, paths["torch"])
    save_state_dict(sd, paths["gguf"], qtype="F32")
    return paths


def measure(src: str, dst: str, qtype: str) -> dict[str, float]:
    """Convert ``src`` in a fresh process; its baseline and peak RSS (KiB) and seconds."""
    out = subprocess.run([sys.executable, "-c", _CHILD, src, dst, qtype], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qtype", default="Q8_0")
    p.add_argument("--tensors", type=int, default=25)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = p.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("Linux only: reads /proc/self/status")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = write_sources(tmp, args.tensors, args.rows, args.cols)
        print(f"{args.tensors} tensors of {args.rows}x{args.cols} float32 "
              f"({args.rows * args.cols * 4 / 2**20:.1f} MiB each), converted to {args.qtype}")
        print(f"{'source':12} {'file MiB':>9} {'base MiB':>9} {'peak MiB':>9} "
              f"{'peak-base MiB':>14} {'seconds':>8}")
        for kind, src in paths.items():
            r = measure(src, os.path.join(tmp, f"out-{kind}.gguf"), args.qtype)
            size = os.path.getsize(src) / 2**20
            print(f"{kind:12} {size:9.1f} {r['base_kib'] / 1024:9.1f} {r['peak_kib'] / 1024:9.1f} "
                  f"{(r['peak_kib'] - r['base_kib']) / 1024:14.1f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
