"""Peak RSS of loading a UMT5-XXL-shaped GGUF text encoder and running it once over 512 tokens:
ggufvideo's ``from_gguf`` (weights stay Q8_0 blocks) vs transformers' ``from_pretrained(gguf_file=)``
(decodes every weight to float32 at load).

The file holds random Q8_0 blocks (finite fp16 scales) in UMT5-XXL's shapes -- vocabulary 256384,
d_model 4096, 64 heads of 64, FFN 10240, gated-GELU, a relative-attention bias in every block --
with llama.cpp's tensor names and metadata, so both loaders read the same file. Each loader runs in
a fresh process; peak RSS is ``ru_maxrss`` (memory-mapped file pages that were read count too).

    PYTHONPATH=src python benchmarks/text_encoder_memory.py --layers 24   # the real depth
    PYTHONPATH=src python benchmarks/text_encoder_memory.py --layers 6 --keep /tmp/te

transformers needs about 4 bytes per parameter (5.7B parameters at 24 layers: ~23 GB) plus its
reader; ``--only ggufvideo`` skips it on a machine without that much memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

VOCAB, D_MODEL, HEADS, D_KV, D_FF, BUCKETS = 256384, 4096, 64, 64, 10240, 32


def _q8_0(rows: int, cols: int, seed: int):  # type: ignore[no-untyped-def]
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType

    from ggufvideo import GGMLTensor

    rng = np.random.default_rng(seed)
    blocks = rows * cols // 32
    raw = rng.integers(-127, 128, size=(blocks, 34), dtype=np.int8).view(np.uint8)
    raw[:, :2] = np.frombuffer(np.float16(0.02).tobytes(), dtype=np.uint8)
    return GGMLTensor(torch.from_numpy(raw.reshape(rows, -1)), GGMLQuantizationType.Q8_0,
                      (rows, cols))


def write_file(path: str, layers: int) -> int:
    """A UMT5-XXL-shaped llama.cpp text-encoder GGUF of random Q8_0 blocks; returns its size."""
    import torch
    from gguf import GGUFValueType

    from ggufvideo.serialize import TypedValue
    from ggufvideo.writer import save_state_dict

    sd = {"token_embd.weight": _q8_0(VOCAB, D_MODEL, 0),
          "enc.output_norm.weight": torch.ones(D_MODEL)}
    inner = HEADS * D_KV
    for i in range(layers):
        b = f"enc.blk.{i}."
        for name, (r, c) in {"attn_q": (inner, D_MODEL), "attn_k": (inner, D_MODEL),
                             "attn_v": (inner, D_MODEL), "attn_o": (D_MODEL, inner),
                             "ffn_gate": (D_FF, D_MODEL), "ffn_up": (D_FF, D_MODEL),
                             "ffn_down": (D_MODEL, D_FF)}.items():
            sd[b + name + ".weight"] = _q8_0(r, c, hash((i, name)) & 0xFFFF)
        sd[b + "attn_rel_b.weight"] = torch.randn(BUCKETS, HEADS).half()
        sd[b + "attn_norm.weight"] = torch.ones(D_MODEL)
        sd[b + "ffn_norm.weight"] = torch.ones(D_MODEL)
    u32 = lambda v: TypedValue(GGUFValueType.UINT32, v)  # noqa: E731
    a = "t5encoder"
    meta = {"general.architecture": a, "general.name": "umt5-xxl (random Q8_0)",
            f"{a}.context_length": u32(512), f"{a}.embedding_length": u32(D_MODEL),
            f"{a}.feed_forward_length": u32(D_FF), f"{a}.block_count": u32(layers),
            f"{a}.attention.head_count": u32(HEADS), f"{a}.attention.key_length": u32(D_KV),
            f"{a}.attention.value_length": u32(D_KV),
            f"{a}.attention.layer_norm_epsilon": 1e-6,
            f"{a}.attention.relative_buckets_count": u32(BUCKETS),
            f"{a}.vocab_size": u32(VOCAB)}
    save_state_dict(sd, path, metadata=meta)
    return os.path.getsize(path)


def _measure(loader: str, path: str, tokens: int) -> dict[str, float]:
    """Run in a fresh process: load with ``loader``, encode ``tokens`` tokens once."""
    import torch

    torch.set_grad_enabled(False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if loader == "ggufvideo":
        import ggufvideo

        model = ggufvideo.from_gguf(path)
    else:
        from transformers import UMT5EncoderModel

        model = UMT5EncoderModel.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path)).eval()
    load_s = time.perf_counter() - t0
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    run_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"baseline_rss_gib": base / 2**20, "after_load_gib": after_load / 2**20,
            "peak_rss_gib": peak / 2**20, "load_s": load_s, "forward_s": run_s,
            "finite": bool(torch.isfinite(out).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--only", choices=("ggufvideo", "transformers"), default=None)
    p.add_argument("--keep", default=None, metavar="DIR", help="write the file here and keep it")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(_measure(args._child[0], args._child[1], args.tokens)))
        return
    folder = args.keep or tempfile.mkdtemp(prefix="te-bench-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"umt5-xxl-{args.layers}l-Q8_0.gguf")
    if not os.path.exists(path):
        write_file(path, args.layers)
    size = os.path.getsize(path) / 2**30
    print(f"file: {path} ({size:.2f} GiB, {args.layers} layers, d_model {D_MODEL}); "
          f"one forward over {args.tokens} tokens; CPU, {os.cpu_count()} cores")
    print(f"{'loader':<14} {'peak RSS':>10} {'RSS after load':>15} {'load':>8} {'forward':>9}")
    for loader in ("ggufvideo", "transformers"):
        if args.only and loader != args.only:
            continue
        proc = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens),
                               "--_child", loader, path], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{loader:<14} failed (exit {proc.returncode}; killed for memory?): "
                  f"{proc.stderr.strip().splitlines()[-1:] }")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{loader:<14} {r['peak_rss_gib']:>8.2f} GiB {r['after_load_gib']:>11.2f} GiB "
              f"{r['load_s']:>7.1f}s {r['forward_s']:>8.1f}s")
    if args.keep is None:
        os.remove(path)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
