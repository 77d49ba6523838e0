"""The ``ggufvideo`` command: ``convert``, ``inspect``, ``validate``, ``demo``, ``generate``.

Exit status: 0 on success (``validate``: only when the file is clean), 1 when the operation failed
or the file has problems, 2 for usage errors, 130 after Ctrl-C and 143 after SIGTERM (both leave
no partial output), 141 when the reader of the output went away (``ggufvideo inspect f | head``:
the output stops quietly, as with other Unix tools).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence

from .errors import GGUFError, _safe

__all__ = ["main", "build_parser"]

# Error messages longer than this are cut (a message may quote a name of any length from a file).
_MESSAGE_LIMIT = 2000


def _override(text: str) -> tuple[str, str]:
    regex, sep, qtype = text.rpartition("=")
    if not sep or not regex or not qtype:
        raise argparse.ArgumentTypeError(f"expected REGEX=TYPE (e.g. 'ffn\\.2\\.weight$=Q6_K'), "
                                         f"got {text!r}")
    return regex, qtype


def _rename(text: str) -> tuple[str, str]:
    regex, sep, repl = text.partition("=")
    if not sep or not regex:
        raise argparse.ArgumentTypeError(f"expected REGEX=REPLACEMENT (e.g. "
                                         f"'^=model.diffusion_model.'), got {text!r}")
    return regex, repl


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    p = argparse.ArgumentParser(prog="ggufvideo",
                                description="Convert, inspect and validate GGUF video models.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"ggufvideo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a checkpoint to GGUF",
                       description="Convert a .safetensors file, a folder of safetensors shards, a "
                       ".pt/.pth state dict or a .gguf (requantize) to GGUF.")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--type", "-t", dest="qtype", default=None,
                   help="ggml type (Q4_K, Q8_0, BF16, ...) or preset (Q4_K_M, Q5_K_M, ...); "
                   "'keep' keeps every tensor's precision (default: Q4_K; with --lora: keep, "
                   "so a touched weight is requantized to its own type)")
    c.add_argument("--override", "-o", action="append", type=_override, default=[],
                   metavar="REGEX=TYPE",
                   help="type for tensors whose name matches REGEX (TYPE may be 'keep'); "
                   "repeatable, first match wins")
    c.add_argument("--keep", action="append", default=[], metavar="REGEX",
                   help="also keep tensors matching REGEX at high precision; repeatable")
    c.add_argument("--keep-type", default=None, metavar="TYPE",
                   help="high-precision type (default: each tensor's source precision)")
    c.add_argument("--min-elements", type=int, default=1024, metavar="N",
                   help="tensors with at most N elements stay high precision (default: 1024)")
    c.add_argument("--imatrix", default=None, metavar="FILE",
                   help="importance matrix from llama.cpp's imatrix tool (GGUF or legacy .dat): "
                   "its entries weight the quantization of the tensors of the same name "
                   "(K-quants, IQ4_*, Q4_0/Q4_1/Q5_0/Q5_1)")
    c.add_argument("--imatrix-rename", action="append", type=_rename, default=[],
                   metavar="REGEX=REPLACEMENT",
                   help="rewrite the imatrix's entry names before matching them to the source's "
                   "(re.sub; repeatable, applied in order), e.g. '^=model.diffusion_model.' adds "
                   "a prefix")
    c.add_argument("--layout", default=None, metavar="LAYOUT",
                   help="tensor names to write for a known model family: 'original' (the "
                        "release's, what published GGUFs and ComfyUI use), 'diffusers', or another "
                        "layout the family lists (ggufvideo inspect names it); default: the "
                        "source's")
    c.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="bake a LoRA into the weights it touches (decoded, delta added in "
                        "float32, requantized exactly); repeatable; SCALE defaults to 1")
    c.add_argument("--device", default=None, help="where to quantize (cpu, cuda; default cpu)")
    c.add_argument("--force", "-f", action="store_true", help="replace DST if it exists")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.add_argument("--verbose", "-v", action="store_true", help="list every tensor's decision")

    i = sub.add_parser("inspect", help="list a GGUF file's metadata and tensors, or describe a "
                       "LoRA file (naming, adapter kinds, ranks, scales, widths)")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-tensors", action="store_true", help="omit the per-tensor list")

    v = sub.add_parser("validate", help="check a GGUF file completely (exit 0 only when clean)")
    v.add_argument("file", metavar="FILE")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="convert, load and run a small video model (no download)")
    d.add_argument("--types", default=None,
                   help="comma-separated types/presets (default: Q8_0,Q5_K_M,Q4_K_M)")
    d.add_argument("--builtin", action="store_true",
                   help="use the built-in model even if diffusers is installed")
    d.add_argument("--keep-files", default=None, metavar="DIR",
                   help="write the files to DIR and keep them (default: a temporary folder, "
                   "removed at the end)")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    d.add_argument("--no-generate", action="store_true",
                   help="skip the text encoder + transformer + VAE generation run")
    _add_generate_parser(sub)
    return p


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    g = sub.add_parser("generate", help="make a video from GGUF files (or diffusers folders)",
                       description="Text-to-video (or image-to-video with --image) with a Wan "
                       "transformer, a UMT5 text encoder and a Wan VAE, each a .gguf file (kept "
                       "quantized), a single .safetensors checkpoint (as ComfyUI setups hold "
                       "them, fp8-scaled ones too) or a diffusers folder.")
    g.add_argument("--model", required=True, metavar="T",
                   help="the transformer (.gguf, .safetensors or folder); Wan 2.2 A14B: the "
                        "high-noise expert")
    g.add_argument("--model-2", default=None, metavar="T2",
                   help="Wan 2.2 A14B's low-noise expert")
    g.add_argument("--boundary-ratio", type=float, default=None,
                   help="with --model-2: where the low-noise expert takes over, between 0 and 1 "
                        "(default 0.9 for I2V experts, 0.875 for T2V)")
    g.add_argument("--text-encoder", required=True, metavar="TE",
                   help="the UMT5 text encoder (.gguf made by llama.cpp, .safetensors, or a "
                        "folder)")
    g.add_argument("--tokenizer", default=None, metavar="TOK",
                   help="tokenizer folder, a GGUF encoder carrying one, or spiece.model "
                        "(default: from the text-encoder file)")
    g.add_argument("--vae", required=True, metavar="VAE",
                   help="the Wan VAE (.gguf, .safetensors or folder)")
    g.add_argument("--image-encoder", default=None, metavar="CLIP",
                   help="CLIP vision folder or .safetensors (clip_vision_h; Wan 2.1 "
                        "image-to-video only)")
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--negative-prompt", "-n", default=None)
    g.add_argument("--image", default=None, metavar="PNG", help="first frame (image-to-video)")
    g.add_argument("--frames", type=int, default=33, help="4k+1 frames (default 33)")
    g.add_argument("--height", type=int, default=480)
    g.add_argument("--width", type=int, default=832)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--flow-shift", type=float, default=None,
                   help="scheduler shift (default 5.0 when the shorter side is 704 or more, "
                        "720p; else 3.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fps", type=int, default=16)
    g.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    g.add_argument("--vram-budget", default=None, metavar="SIZE",
                   help="GPU memory for weights, e.g. 8GiB: each part (text encoder, transformer, "
                        "each Wan 2.2 expert, VAE) is streamed under it in turn, one at a time; "
                        "needs CUDA")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA on the transformer (with --model-2: the high-noise expert), "
                        "applied unmerged; repeat to stack")
    g.add_argument("--lora-2", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA on --model-2, the low-noise expert")
    g.add_argument("--dtype", default=None,
                   help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--output", "-o", required=True, metavar="OUT.mp4",
                   help="the video (.mp4, .mkv, .mov or .avi); a contact sheet OUT.png "
                        "is written beside it")
    g.add_argument("--force", action="store_true",
                   help="replace OUT and OUT.png if they exist")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .lora.bake import parse_lora_arg
    from .policy import QuantPolicy

    given = args.qtype if args.qtype is not None else ("keep" if args.lora else "Q4_K")
    qtype = None if given.strip().lower() == "keep" else given
    loras = [parse_lora_arg(a) for a in args.lora]
    policy = QuantPolicy.from_type(qtype, overrides=args.override, keep=args.keep,
                                   min_elements=args.min_elements, keep_type=args.keep_type)
    if args.imatrix_rename and not args.imatrix:
        raise ValueError("--imatrix-rename needs --imatrix")
    summary = convert(args.src, args.dst, policy=policy, force=args.force,
                      progress=not args.quiet, device=args.device, imatrix=args.imatrix,
                      imatrix_rename=args.imatrix_rename, layout=args.layout,
                      loras=loras)
    if args.verbose:
        used = set(summary.imatrix_used)
        for name, d in summary.decisions.items():
            extra = f" [{d.fallback}]" if d.fallback else ""
            if name in used:
                extra += " [imatrix]"
            if name in summary.lora_changed:
                extra += " [lora]"
            print(f"  {_safe(name)}: {d.qtype.name} ({d.reason}){extra}")
    print(summary)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import format_inspection, inspect_file

    if os.path.isdir(args.file) or (os.path.isfile(args.file) and not _is_gguf(args.file)):
        return _inspect_lora(args)
    info = inspect_file(args.file)
    if args.no_tensors:
        info = {**info, "tensors": []} if args.json else info
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_inspection(info, tensors=not args.no_tensors))
    return 0


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _inspect_lora(args: argparse.Namespace) -> int:
    from .errors import LoraError
    from .lora.describe import describe_lora, format_lora

    try:
        info = describe_lora(args.file)
    except LoraError as exc:
        if not exc.reason.startswith(("not a LoRA", "cannot read")):
            raise  # a LoRA, but a broken one: say so
        return _inspect_checkpoint(args, exc)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_lora(info))
    return 0


def _inspect_checkpoint(args: argparse.Namespace, lora_error: GGUFError) -> int:
    """A file that is neither GGUF nor a LoRA: a model checkpoint, described by its header."""
    from .inspection import format_checkpoint, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.file)
    except GGUFError as exc:
        raise GGUFError(f"not a GGUF file, a LoRA or a checkpoint this package reads: "
                        f"{exc.reason}", path=args.file) from None
    if args.no_tensors and args.json:
        info = {**info, "tensors": []}
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_checkpoint(info, tensors=not args.no_tensors))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .inspection import validate_file

    report = validate_file(args.file)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from .inspection import _printable

        for w in report.warnings:
            print(f"warning: {_printable(w)}")
        for e in report.errors:
            print(f"error: {_printable(e)}")
        status = "OK" if report.ok else f"FAILED ({len(report.errors)} problem(s))"
        print(f"{_safe(report.path, 400)}: {status}: {report.tensors_checked} tensors, "
              f"{report.bytes_checked:,} bytes of data checked")
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_TYPES, run_demo

    types = tuple(t.strip() for t in args.types.split(",") if t.strip()) if args.types \
        else DEFAULT_TYPES
    run_demo(types, builtin=args.builtin, workdir=args.keep_files, progress=not args.quiet,
             generate=not args.no_generate)
    return 0


def _generate(args: argparse.Namespace) -> int:

    import torch

    from .generation import check_video_size, contact_sheet, generate, write_video
    from .lora.bake import parse_lora_arg
    from .pipeline_parts import describe_part, video_factors
    from .pipelines import pipeline

    # before anything is loaded: the size the model makes (first Wan's multiples of 16, then
    # from the files' headers: multiples of 32 for TI2V-5B, whose VAE compresses 16x), and
    # where the outputs go
    check_video_size(args.frames, args.height, args.width)
    spatial, temporal = video_factors(describe_part("transformer", args.model),
                                      describe_part("vae", args.vae))
    check_video_size(args.frames, args.height, args.width, spatial=spatial, temporal=temporal)
    sheet_path = _check_outputs(args.output, args.image, args.force)
    device = args.device or ("cuda" if torch.cuda.is_available() or args.vram_budget else "cpu")
    # 720p (and TI2V-5B's 704x1280) takes Wan's larger shift
    shift = args.flow_shift if args.flow_shift is not None else (
        5.0 if min(args.height, args.width) >= 704 else 3.0)
    image = None
    if args.image is not None:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    pipe = pipeline(transformer=args.model, text_encoder=args.text_encoder, vae=args.vae,
                    transformer_2=args.model_2, tokenizer=args.tokenizer,
                    image_encoder=args.image_encoder, image_to_video=image is not None,
                    boundary_ratio=args.boundary_ratio,
                    flow_shift=shift, dtype=args.dtype, device=device,
                    vram_budget=args.vram_budget,
                    loras=[parse_lora_arg(a) for a in args.lora],
                    loras_2=[parse_lora_arg(a) for a in args.lora_2])
    frames = generate(pipe, args.prompt, negative_prompt=args.negative_prompt,
                      frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, image=image,
                      progress=not args.quiet)
    sheet = contact_sheet(frames, sheet_path)
    try:
        write_video(frames, args.output, fps=args.fps)
    except ImportError as exc:
        print(f"ggufvideo generate: {exc}", file=sys.stderr)
        print(f"wrote {_safe(sheet)}")
        return 1
    print(f"wrote {_safe(args.output)} ({len(frames)} frames, {args.width}x{args.height}) and "
          f"{_safe(sheet)}")
    return 0


#: Containers the video writer (imageio-ffmpeg, H.264) makes; not WebM, which cannot hold it.
_VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")


def _check_outputs(output: str, image: str | None, force: bool) -> str:
    """The contact sheet's path, once the video's and the sheet's are known to be writable and
    not to replace anything they should not: checked before minutes of generation."""
    import os

    if image is not None and not os.path.isfile(image):
        raise FileNotFoundError(f"--image {_safe(image)}: no such file")
    if os.path.isdir(output):
        raise ValueError(f"--output {_safe(output)} is a folder: name the video file in it "
                         "(e.g. out.mp4)")
    stem, ext = os.path.splitext(output)
    if ext.lower() not in _VIDEO_SUFFIXES:
        raise ValueError(f"--output {_safe(output)}: the video must end in one of "
                         f"{', '.join(_VIDEO_SUFFIXES)}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"--output {_safe(output)}: no folder {_safe(folder)}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {_safe(output)}: the folder {_safe(folder)} is not writable")
    sheet = stem + ".png"
    if os.path.isdir(sheet):
        raise ValueError(f"the contact sheet {_safe(sheet)} would replace a folder: choose "
                         "another --output")
    from .serialize import same_file

    if any(same_file(image, p) for p in (output, sheet)):
        raise ValueError(f"--output {_safe(output)} would overwrite the input image "
                         f"{_safe(image)} (with the video or its contact sheet {_safe(sheet)})")
    existing = [p for p in (output, sheet) if os.path.lexists(p)]  # a dangling link too
    if existing and not force:
        raise ValueError(f"{', '.join(_safe(p) for p in existing)} already exist(s): pass "
                         "--force to replace, or another --output")
    return sheet


_COMMANDS = {"convert": _convert, "inspect": _inspect, "validate": _validate, "demo": _demo,
             "generate": _generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _terminate_as_interrupt():
            status = _COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
            return status
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except (GGUFError, OSError, ValueError) as exc:
        # Messages may quote names from the file: escaped and bounded before they reach a terminal.
        print(f"ggufvideo {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"ggufvideo {args.command}: {what}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130


def _silence_stdout() -> None:
    """The reader of stdout is gone (``| head``): point stdout at /dev/null, so that Python's
    final flush at exit does not report the broken pipe a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests, notebooks)
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanups run (exit status 128 + 15)."""


def _message(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > _MESSAGE_LIMIT or not text.isprintable():
        from .inspection import _printable

        text = _printable(text, _MESSAGE_LIMIT)
    return text


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``kill``, a job scheduler, ``docker stop``) as Ctrl-C while a command runs.

    Python's default for SIGTERM ends the process at once, skipping the ``finally`` blocks that
    remove a conversion's temporary file; raising ``KeyboardInterrupt`` runs them. Only possible
    from the main thread; elsewhere the default stays.
    """
    def interrupt(signum: int, frame: object) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except (ValueError, AttributeError):  # not the main thread / no SIGTERM on this platform
        yield
        return
    try:
        yield
    finally:
        # None: the previous handler was not set from Python; the default is the closest.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
