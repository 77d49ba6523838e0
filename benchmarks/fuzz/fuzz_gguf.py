"""The long fuzz run for the GGUF parser and loader.

    python benchmarks/fuzz/fuzz_gguf.py --cases 100000 [--seed 0] [--out fuzz-crashes]

Each case mutates a valid seed file (see tests/fuzzing.py for the catalogue) and runs every entry
point on it: open, decode all metadata, load_state_dict eager and lazy, inspect, validate. A case
passes when it loads or raises a GGUFError naming the file; anything else (another exception type,
a hang past the per-case limit) is a finding, saved under --out with its mutation description.
Prints counts per outcome and the findings at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import numpy as np  # noqa: E402
from fuzzing import check, mutate, seeds  # noqa: E402


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--out", default="fuzz-crashes", help="where findings are saved")
    args = ap.parse_args()

    pool = seeds()
    rng = np.random.default_rng(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    findings = []
    signal.signal(signal.SIGALRM, _alarm)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.gguf"
        for i in range(args.cases):
            seed = pool[int(rng.integers(0, len(pool)))]
            data, desc = mutate(seed, rng)
            path.write_bytes(data)
            signal.alarm(int(args.time_limit) + 1)
            try:
                outcomes[check(path, time_limit=args.time_limit)] += 1
            except (AssertionError, _Timeout) as e:
                outcomes["FINDING"] += 1
                os.makedirs(args.out, exist_ok=True)
                dst = Path(args.out) / f"case{i:07d}.gguf"
                dst.write_bytes(data)
                findings.append((str(dst), seed.name, desc, str(e)[:300] or "timeout"))
            finally:
                signal.alarm(0)
            if (i + 1) % 5000 == 0:
                rate = (i + 1) / (time.perf_counter() - t_start)
                print(f"{i + 1} cases, {rate:.0f}/s, findings {outcomes['FINDING']}", flush=True)
    elapsed = time.perf_counter() - t_start
    print(f"\n{args.cases} cases in {elapsed:.0f} s (seed {args.seed})")
    for k, v in outcomes.most_common():
        print(f"  {k:<24}{v:>8}")
    for f in findings:
        print("FINDING", *f, sep="\n  ")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
