"""Weight streaming on a GPU: a full diffusers ``WanTransformer3DModel``, resident vs streamed.

Random weights with Wan 2.1 14B shapes (or 1.3B: ``--shape 1.3b``): every ``nn.Linear`` whose
rows are a multiple of 256 holds random Q4_K blocks (a ``GGMLTensor``), the rest bf16. One
denoising step (one forward) at ``--tokens`` (32,760 = 480x832x81; 8,190 = a quarter), bf16
compute. Variants, side by side in one process:

* ``bf16 resident`` and ``q4k resident`` (ggufvideo's lazy layers);
* ``q4k offload <p>%``: :func:`ggufvideo.offload` with a budget holding ``p``% of the weights,
  the process capped with ``torch.cuda.set_per_process_memory_fraction`` at budget + the
  activations measured in the resident run (+15%, + 512 MiB);
* ``bf16 group_offload`` / ``q4k group_offload``: diffusers' ``enable_group_offload(
  offload_type="block_level", num_blocks_per_group=1, use_stream=True)``.

Also ``--load``: bandwidth of ``load_model(..., device="cuda")`` from a GGUF file in the page
cache in each upload mode (``plain`` ``.to()`` per tensor; ``register``: the mapping page-locked in
place; ``read``: pinned staging buffers filled by reader threads, at the defaults and at other
chunk/buffer/thread/lane settings, the previous defaults among them, timed in a round robin of
``--load-rounds`` rounds), against pinned and pageable host-to-device copies of the same size, and
as the first load of three fresh processes (``--no-first-load`` skips those)
(``python benchmarks/gpu_offload.py --load --load-gib 8 --out DIR``; the issue's goal is
``load_model_read_default_vs_pinned >= 0.7``).

Run: ``python benchmarks/gpu_offload.py --shape 14b --tokens 32760 --out DIR``.
Prints one JSON line per variant and writes them to ``DIR/offload_<shape>_<tokens>.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# Before torch initialises CUDA: segments that grow in place, so the memory cap below measures
# what is allocated rather than what the caching allocator strands between block sizes. Not for
# --load, which ran with the default allocator before (its runs since have not finished: see
# the progress lines it prints).
if "--load" not in sys.argv and "--first-load" not in sys.argv:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_dequant import pinned_h2d_bandwidth, random_blocks  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGMLTensor  # noqa: E402
from ggufvideo.ops import swap_quant_layers  # noqa: E402

SHAPES = {
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
}
GRID = {32760: (21, 60, 104), 8190: (21, 30, 52)}


def build(shape: str, quant: bool, device: str) -> nn.Module:
    from diffusers import WanTransformer3DModel

    cfg = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **SHAPES[shape])
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if quant and isinstance(mod, nn.Linear) and name == "weight" and p.shape[1] % 256 == 0:
                raw = random_blocks("Q4_K", p.numel() // 256, "cuda", gen).view(p.shape[0], -1)
                t = GGMLTensor(raw.to(device), "Q4_K", p.shape, torch.bfloat16)
            else:
                t = (torch.randn(p.shape, device="cuda", generator=gen) * 0.02).to(torch.bfloat16).to(device)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for mod in model.modules():  # non-persistent buffers (rope) were built on meta
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    if hasattr(model, "rope"):
        rope = type(model.rope)(model.rope.attention_head_dim, model.rope.patch_size, model.rope.max_seq_len)
        model.rope = rope.to(device)
    if quant:
        swap_quant_layers(model)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    return sum(t.raw.nbytes if isinstance(t, GGMLTensor) else t.nbytes
               for t in [*model.parameters(), *model.buffers()])


def inputs(tokens: int) -> dict:
    f, h, w = GRID[tokens]
    g = torch.Generator(device="cuda").manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, f, h, w, device="cuda", generator=g, dtype=torch.bfloat16),
                timestep=torch.tensor([500], device="cuda"),
                encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", generator=g,
                                                  dtype=torch.bfloat16),
                return_dict=False)


def step_ms(model: nn.Module, x: dict, reps: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model(**x)[0]  # warm-up (and the order-learning pass for offload)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model(**x)[0]
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], out


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def cap(nbytes: int | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if nbytes is None else min(1.0, nbytes / total))


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    x = inputs(args.tokens)
    out_path = os.path.join(args.out, f"offload_{args.shape}_{args.tokens}.jsonl")

    def emit(row: dict) -> None:
        row.update(shape=args.shape, tokens=args.tokens, host_rss_gib=round(rss_gib(), 2),
                   peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def save() -> None:  # all rows again: ratios and output differences are added after emit
        with open(out_path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    def measure(name: str, model: nn.Module, **extra: object) -> tuple[float, torch.Tensor]:
        torch.cuda.reset_peak_memory_stats()
        ms, out = step_ms(model, x, args.reps)
        emit(dict(variant=name, ms=round(ms, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  **extra))
        return ms, out

    # bf16 resident + diffusers group offload of the bf16 model
    ref = {}
    if "bf16" in args.variants:
        m = build(args.shape, False, "cuda")
        wb = weight_bytes(m)
        ms, out = measure("bf16 resident", m, weight_gib=round(wb / 2**30, 2))
        ref["bf16"] = ms
        m = m.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        m.enable_group_offload(onload_device=torch.device("cuda"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
        ms2, _ = measure("bf16 group_offload", m)
        rows[-1]["ratio_vs_bf16_resident"] = round(ms2 / ms, 3)
        ref["bf16_go"] = ms2 / ms
        del m, out
        gc.collect()
        torch.cuda.empty_cache()

    # q4k resident
    m = build(args.shape, True, "cuda")
    wq = weight_bytes(m)
    ms_q, out_q = measure("q4k resident", m, weight_gib=round(wq / 2**30, 2))
    act = torch.cuda.max_memory_allocated() - wq
    if "bf16" in ref:
        rows[-1]["ratio_vs_bf16_resident"] = round(ms_q / ref["bf16"], 3)
    out_q = out_q.float().cpu()
    m = m.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()

    # q4k streamed under budgets
    for pct in args.budgets:
        budget = int(wq * pct / 100)
        try:
            h = ggufvideo.offload(m, "cuda", budget=budget, prefetch=args.prefetch)
        except ValueError as e:
            emit(dict(variant=f"q4k offload {pct}%", error=str(e)))
            continue
        # Headroom over budget + activations for the allocator's rounding (expandable segments,
        # set at the top of this file, keep fragmentation from counting against the cap).
        cap(int((budget + act) * 1.15) + 512 * 2**20)
        ms_s, out_s = measure(f"q4k offload {pct}%", m, budget_gib=round(budget / 2**30, 2),
                              device_weight_gib=round(h.device_bytes / 2**30, 2),
                              resident_fraction=round(h.resident_bytes / wq, 3),
                              activations_gib=round(act / 2**30, 2),
                              registered_gib=round(h.registration.registered_bytes / 2**30, 2)
                              if h.registration else 0,
                              pinned_copy_gib=round(h.registration.copied_bytes / 2**30, 2)
                              if h.registration else 0)
        rows[-1]["ratio_vs_q4k_resident"] = round(ms_s / ms_q, 3)
        rows[-1]["max_abs_diff_vs_resident"] = float((out_s.float().cpu() - out_q).abs().max())
        cap(None)
        h.remove()
        del out_s
        gc.collect()
        torch.cuda.empty_cache()

    # diffusers group offload of the q4k model
    if "q4k_go" in args.variants:
        try:
            m.enable_group_offload(onload_device=torch.device("cuda"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True)
            ms_g, out_g = measure("q4k group_offload", m)
            rows[-1]["ratio_vs_q4k_resident"] = round(ms_g / ms_q, 3)
            rows[-1]["max_abs_diff_vs_resident"] = float((out_g.float().cpu() - out_q).abs().max())
            if "bf16_go" in ref:
                rows[-1]["go_ratio_vs_bf16_go_ratio"] = round((ms_g / ms_q) / ref["bf16_go"], 3)
        except Exception as e:  # noqa: BLE001
            emit(dict(variant="q4k group_offload", error=f"{type(e).__name__}: {e}"[:500]))
    save()
    return rows


def _rss_anon() -> int:
    """This process's anonymous resident memory in bytes (Linux), 0 where unknown."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon"))
    except (OSError, StopIteration):
        return 0


class _Linears(nn.Module):
    """The model --load fills: ``n`` 5120x5120 linears, the file's ``l.{i}.weight``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l = nn.ModuleList(nn.Linear(5120, 5120, bias=False) for _ in range(n))

    def forward(self, x):  # pragma: no cover
        return x


def _load_model_shell(n: int) -> nn.Module:
    """``_Linears(n)`` with its parameters on the meta device, built before a timed load."""
    with ggufvideo.empty_weights():
        return _Linears(n)


def load_bandwidth(args: argparse.Namespace) -> None:
    """load_model(device='cuda') from the page cache vs pinned H2D, same file."""
    from ggufvideo.runtime._staging import register_host

    n_layers = args.load_gib * 2**30 // (5120 * 5120 // 256 * 144)
    folder = args.tmp
    if folder == "auto":
        # A file in tmpfs is in the page cache by construction, and its fsync (which
        # save_state_dict does before publishing) costs nothing; a lent machine's disk may be
        # slow enough that writing the test file dominates the run.
        shm = "/dev/shm"
        room = shutil.disk_usage(shm).free if os.path.isdir(shm) else 0
        folder = shm if room > 1.5 * args.load_gib * 2**30 else tempfile.gettempdir()
    path = os.path.join(folder, "bw.gguf")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sd = {f"l.{i}.weight": GGMLTensor(random_blocks("Q4_K", 5120 * 20, "cuda", gen).view(5120, -1).cpu(),
                                     "Q4_K", (5120, 5120), torch.bfloat16) for i in range(int(n_layers))}
    t_start = time.perf_counter()

    def progress(what: str) -> None:  # one line per stage, so a run cut short shows where it was
        print(f"[load {time.perf_counter() - t_start:7.1f} s] {what}", flush=True)

    progress(f"{len(sd)} tensors made; writing {path}")
    ggufvideo.save_state_dict(sd, path, overwrite=True)  # a run cut short leaves its file
    del sd
    size = os.path.getsize(path)
    progress(f"{size / 2**30:.2f} GiB written (fsynced)")
    with open(path, "rb") as fh:  # into the page cache
        while fh.read(1 << 26):
            pass
    progress("read back into the page cache")

    def model() -> nn.Module:
        return _load_model_shell(int(n_layers))

    res = {"variant": "load", "file_gib": round(size / 2**30, 2)}
    # A fresh process each: nothing cached. "warm_alloc": the same process first makes and frees
    # device tensors of the file's sizes (the caching allocator's segments exist), so the gap
    # between the two is what cudaMalloc costs a first load; "warm_pinned" also runs one load of
    # the file before the timed one (pinned buffers, imports, first dispatches all warm).
    # "cold_arena": cold, with the device buffers as views of one allocation (_upload.ARENA).
    for what in ("cold", "cold_arena", "warm_alloc", "warm_pinned"):
        firsts = []
        env = {**os.environ, "GGUFVIDEO_UPLOAD_ARENA": "1" if what == "cold_arena" else "0"}
        for _ in range(3 if args.first_loads else 0):
            child = subprocess.run([sys.executable, __file__, "--first-load", path,
                                    str(int(n_layers)), what], env=env,
                                   capture_output=True, text=True, timeout=300, check=True)
            firsts.append(json.loads(child.stdout.strip().splitlines()[-1])["first_load_gbs"])
        key = "load_model_first_in_process_gbs" + ("" if what == "cold" else f"_{what}")
        res[key] = firsts
        progress(f"load_model, first in a fresh process ({what}): {firsts} GB/s")
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    res["pinned_h2d_gbs"] = round(pinned_h2d_bandwidth(dst), 1)
    pageable = torch.empty(size, dtype=torch.uint8)
    pageable.fill_(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(pageable)
    torch.cuda.synchronize()
    res["pageable_h2d_gbs"] = round(size / (time.perf_counter() - t0) / 1e9, 1)
    del dst, pageable
    progress(f"pinned {res['pinned_h2d_gbs']} GB/s, pageable {res['pageable_h2d_gbs']} GB/s")
    from ggufvideo.runtime import _upload

    def best_median(rates: list[float]) -> tuple[float, float]:
        rates = sorted(rates)
        return round(rates[-1], 2), round(rates[len(rates) // 2], 2)

    def one_load(mode: str, knobs: dict[str, int]) -> float:
        """GB/s of one ``load_model`` in upload mode ``mode`` with ``_upload``'s ``knobs`` set."""
        saved = {k: getattr(_upload, k) for k in knobs}
        _upload.MODE = mode
        for k, v in knobs.items():
            setattr(_upload, k, v)
        try:
            m = model()  # the caller's model, built before: load_model is what is timed
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ggufvideo.load_model(m, path, device="cuda")
            torch.cuda.synchronize()
            rate = size / (time.perf_counter() - t0) / 1e9
            del m
            return rate
        finally:
            _upload.MODE = "read"
            for k, v in saved.items():
                setattr(_upload, k, v)

    def timed_load(mode: str, reps: int) -> tuple[float, float]:
        """(best, median) GB/s of ``reps`` loads after a warm-up one (allocator, pinned pool)."""
        gc.collect()
        torch.cuda.empty_cache()
        rates = [one_load(mode, {}) for _ in range(reps + 1)][1:]
        best, median = best_median(rates)
        progress(f"load_model, mode {mode}: best {best} median {median} GB/s")
        return best, median

    res["load_model_plain_gbs"] = timed_load("plain", reps=2)[0]
    res["load_model_register_gbs"] = timed_load("register", reps=2)[0]
    res["readers_default"] = _upload.READERS
    # "read" at the defaults and at other settings (chunk MiB, buffers per reader, readers,
    # through libcudart, SYNC_LANES: a stream per reader, waited on after each chunk), over a
    # base of event lanes with 2 x 4 MiB buffers per reader (the default before a86bbb1). Timed
    # in a round robin, one load of each setting per round after a warm-up load of each: a lent
    # host's bandwidth drifts during a run, and consecutive loads per setting turned that drift
    # into differences between settings.
    # (with ARENA: the device buffers as views of one allocation, the first-load candidate)
    settings: dict[str, dict[str, int]] = {"load_model_read_default_gbs": {},
                                           "load_model_read_default_arena_gbs": {"ARENA": 1}}
    sweep = [dict(), dict(USE_CUDART=0), dict(CHUNK_BYTES=8), dict(CHUNK_BYTES=16),
             dict(READERS=12), dict(SYNC_LANES=1), dict(SYNC_LANES=1, CHUNK_BYTES=16),
             dict(SYNC_LANES=1, CHUNK_BYTES=8, READERS=12)]
    for knobs in sweep if args.load_sweep else []:
        knobs = {"CHUNK_BYTES": 4, "BUFFERS": 2, "READERS": _upload.READERS, "USE_CUDART": 1,
                 "SYNC_LANES": 0, **knobs}
        key = (f"load_model_read_{knobs['CHUNK_BYTES']}MiB_{knobs['BUFFERS']}buf_"
               f"{knobs['READERS']}thr{'' if knobs['USE_CUDART'] else '_torchcalls'}"
               f"{'_sync' if knobs['SYNC_LANES'] else ''}_gbs")
        knobs["CHUNK_BYTES"] <<= 20
        settings[key] = knobs
    gc.collect()
    torch.cuda.empty_cache()
    for knobs in settings.values():
        one_load("read", knobs)  # warm-up: allocator, pinned pool
    rounds: dict[str, list[float]] = {key: [] for key in settings}
    for _ in range(args.load_rounds):
        for key, knobs in settings.items():
            rounds[key].append(one_load("read", knobs))
    for key, rates in rounds.items():
        res[key], res[key.replace("_gbs", "_median_gbs")] = best_median(rates)
        progress(f"load_model, read {settings[key] or '(defaults)'}: best {res[key]} median "
                 f"{res[key.replace('_gbs', '_median_gbs')]} GB/s")
    # the staged copy alone (what load_model adds on top: reading the header, building and
    # assigning the tensors)
    from ggufvideo.loader import read_tensors
    from ggufvideo.reader import GGUFFile

    file = GGUFFile(path)
    lazy = read_tensors(file, lazy=True)
    rates = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        moved = _upload.upload_state(lazy, list(lazy), torch.device("cuda"), file)
        torch.cuda.synchronize()
        rates.append(size / (time.perf_counter() - t0) / 1e9)
        del moved
    res["upload_only_default_gbs"], res["upload_only_default_median_gbs"] = best_median(rates[1:])
    del lazy, file
    res["load_model_read_default_vs_pinned"] = round(
        res["load_model_read_default_gbs"] / res["pinned_h2d_gbs"], 3)
    res["load_model_read_default_median_vs_pinned"] = round(
        res["load_model_read_default_median_gbs"] / res["pinned_h2d_gbs"], 3)
    res["load_model_register_vs_pinned"] = round(
        res["load_model_register_gbs"] / res["pinned_h2d_gbs"], 3)
    # registered staging of the mapped file (what offload uses), then one async copy per tensor
    sd = ggufvideo.load_state_dict(path, lazy=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    anon0 = _rss_anon()
    reg, sources = register_host([t.raw for t in sd.values()])
    t1 = time.perf_counter()
    anon1 = _rss_anon()
    outs = [torch.empty(src.numel(), dtype=torch.uint8, device="cuda").copy_(src, non_blocking=True)
            for src in sources if src is not None]
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    res.update(registered_all=all(src is not None for src in sources),
               registered_through_shared_mapping_gib=round(reg.remapped_bytes / 2**30, 2),
               register_s=round(t1 - t0, 3), register_anon_growth_gib=round((anon1 - anon0) / 2**30, 2),
               registered_copy_gbs=round(size / (t2 - t1) / 1e9, 1),
               register_plus_copy_gbs=round(size / (t2 - t0) / 1e9, 1))
    reg.release()
    del outs
    print(json.dumps(res), flush=True)
    with open(os.path.join(args.out, "load_bandwidth.json"), "w") as fh:
        json.dump(res, fh)
    os.remove(path)


def first_load(path: str, n_layers: int, what: str = "cold") -> None:
    """One ``load_model`` in this fresh process (its CUDA context made first, not timed): what a
    user's single load costs, pinned-memory and allocator caches empty, one-time imports included
    (``what="cold"``); with the allocator's segments made first (``"warm_alloc"``); after one
    untimed load (``"warm_pinned"``). Prints JSON."""
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    if what == "warm_alloc":
        with ggufvideo.GGUFFile(path) as g:
            held = [torch.empty(i.nbytes, dtype=torch.uint8, device="cuda")
                    for i in g.tensors.values()]
        del held
        torch.cuda.synchronize()
    elif what == "warm_pinned":
        ggufvideo.load_model(_load_model_shell(n_layers), path, device="cuda")
        gc.collect()
        torch.cuda.synchronize()

    m = _load_model_shell(n_layers)
    t0 = time.perf_counter()
    ggufvideo.load_model(m, path, device="cuda")
    torch.cuda.synchronize()
    print(json.dumps({"first_load_gbs": round(os.path.getsize(path) / (time.perf_counter() - t0) / 1e9, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="14b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=32760, choices=sorted(GRID))
    ap.add_argument("--budgets", type=int, nargs="*", default=[50, 15])
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=["bf16", "q4k_go"])
    ap.add_argument("--load", action="store_true", help="only the load bandwidth test")
    ap.add_argument("--load-gib", type=int, default=4)
    ap.add_argument("--load-rounds", type=int, default=7,
                    help="--load: rounds of the round robin over staging settings")
    ap.add_argument("--no-first-load", dest="first_loads", action="store_false",
                    help="--load without the three loads in fresh processes")
    ap.add_argument("--no-load-sweep", dest="load_sweep", action="store_false",
                    help="--load without the sweep of chunk/buffer/reader settings")
    ap.add_argument("--tmp", default="auto",
                    help="folder for --load's file (auto: /dev/shm when it has room)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--first-load", nargs="+", metavar="PATH N_LAYERS [WHAT]",
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_rounds < 1:
        ap.error("--load-rounds must be at least 1")
    if args.first_load:  # the child process of --load's first-load measurement
        first_load(args.first_load[0], int(args.first_load[1]), *args.first_load[2:3])
        return
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    if args.load:
        load_bandwidth(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
