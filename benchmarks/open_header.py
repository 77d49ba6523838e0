"""Open a GGUF file and list its tensors: ggufvideo.GGUFFile vs gguf-py's GGUFReader.

The file carries an LLM-style 262,144-token vocabulary (tokens, scores, token types) — the case that
makes eager metadata parsing slow — plus a few hundred small tensors.

    python benchmarks/open_header.py [--vocab 262144] [--tensors 400] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import gguf
import numpy as np

from ggufvideo import GGUFFile


def make_file(path: str, vocab: int, n_tensors: int) -> None:
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("tokenizer.ggml.tokens", [f"tok_{i}" for i in range(vocab)])
    w.add_array("tokenizer.ggml.scores", np.linspace(-1, 0, vocab, dtype=np.float32).tolist())
    w.add_array("tokenizer.ggml.token_type", [1] * vocab)
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.weight", np.zeros((4, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--tensors", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vocab.gguf")
        make_file(path, args.vocab, args.tensors)
        size = os.path.getsize(path)

        def ours() -> None:
            with GGUFFile(path) as f:
                assert len([t.name for t in f.tensors.values()]) == args.tensors

        def theirs() -> None:
            r = gguf.GGUFReader(path)
            assert len([t.name for t in r.tensors]) == args.tensors

        t_ours = best_of(ours, args.repeat)
        t_theirs = best_of(theirs, max(1, min(args.repeat, 2)))
    print(f"file: {size / 2**20:.1f} MiB, vocabulary {args.vocab}, {args.tensors} tensors")
    print(f"{'reader':<26}{'open + list (s)':>16}")
    print(f"{'ggufvideo.GGUFFile':<26}{t_ours:>16.4f}")
    print(f"{'gguf.GGUFReader':<26}{t_theirs:>16.4f}")
    print(f"speedup: {t_theirs / t_ours:.1f}x")


if __name__ == "__main__":
    main()
