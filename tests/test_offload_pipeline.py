"""Pipelines under a VRAM budget: each part (text encoder, transformer, each Wan 2.2 expert, VAE)
streamed with ggufvideo.offload in turn, one at a time. On CPU with a recording backend (the
device copies are plain CPU copies); the budget-without-CUDA errors are checked too."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_offload import RecordingBackend  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo.cli import main  # noqa: E402
from ggufvideo.demo_generate import build_demo_parts, write_demo_files  # noqa: E402
from ggufvideo.generation import generate  # noqa: E402
from ggufvideo.model import parameter_bytes  # noqa: E402
from ggufvideo.pipelines import PipelineError, pipeline  # noqa: E402
from ggufvideo.runtime import PartSequence, stream_pipeline  # noqa: E402

GEN = dict(frames=5, height=32, width=32, steps=2, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_demo_files(str(tmp_path_factory.mktemp("parts")), build_demo_parts())


def _budget(pipe) -> int:
    # 70% of the transformer: it streams (two slots of its largest group fit); the other parts
    # fit or stream under the same budget
    return parameter_bytes(pipe.transformer) * 7 // 10


def _watch(pipe, seq: PartSequence, names) -> list[tuple[str, str | None, bool]]:
    """Record, as each part runs, which part is active and whether its own weights stream."""
    seen: list[tuple[str, str | None, bool]] = []
    for name in names:
        part = getattr(pipe, name)
        target = part.decoder if name == "vae" else part

        def hook(m, args, _n=name):
            h = seq.handle
            seen.append((_n, seq.active, h is not None and h.model is getattr(pipe, _n)))
        target.register_forward_pre_hook(hook)
    return seen


def test_parts_take_the_device_in_turn_and_the_video_is_unchanged(files):
    ref_pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                        vae=files["vae"])
    ref = generate(ref_pipe, "a cat", **GEN)
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"])
    seq = stream_pipeline(pipe, "cpu", _budget(pipe), backend=lambda d: RecordingBackend())
    assert pipe._ggufvideo_stream is seq and set(seq.parts) == {"text_encoder", "transformer", "vae"}
    seen = _watch(pipe, seq, ["text_encoder", "transformer", "vae"])
    video = generate(pipe, "a cat", **GEN)
    assert (video == ref).all()
    # encoder, then transformer, then VAE: one switch each, not one per step or per call
    assert seq.switches == [(None, "text_encoder"), ("text_encoder", "transformer"),
                            ("transformer", "vae")]
    # every part ran while it was the active one, through its own offload handle
    assert {s[0] for s in seen} == {"text_encoder", "transformer", "vae"}
    assert all(name == active and own for name, active, own in seen)
    # the pipeline computes on the sequence's device (diffusers reads _hf_hook.execution_device)
    assert pipe._execution_device == torch.device("cpu")
    # a second generation starts again from the encoder
    again = generate(pipe, "a cat", **GEN)
    assert (again == ref).all() and seq.switches[3] == ("vae", "text_encoder")
    seq.remove()
    assert not hasattr(pipe.vae, "_hf_hook") and "decode" not in pipe.vae.__dict__
    assert (generate(pipe, "a cat", **GEN) == ref).all()


def test_the_transformer_streams_under_the_budget(files):
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"])
    budget = _budget(pipe)
    seq = stream_pipeline(pipe, "cpu", budget, backend=lambda d: RecordingBackend())
    sizes = {}

    def note(m, args):
        sizes[seq.active] = (seq.handle.streamed_bytes, seq.handle.device_bytes)
    pipe.transformer.blocks[0].register_forward_pre_hook(note)
    generate(pipe, "a cat", **GEN)
    streamed, on_device = sizes["transformer"]
    assert streamed > 0 and on_device <= budget


def test_each_wan22_expert_is_a_part_of_its_own(files, tmp_path):
    import shutil

    low = shutil.copy(files["transformer"], tmp_path / "low_noise.gguf")
    pipe = pipeline(transformer=files["transformer"], transformer_2=low,
                    text_encoder=files["text_encoder"], vae=files["vae"], boundary_ratio=0.95)
    ref = generate(pipe, "a cat", **{**GEN, "steps": 4})
    seq = stream_pipeline(pipe, "cpu", _budget(pipe), backend=lambda d: RecordingBackend())
    video = generate(pipe, "a cat", **{**GEN, "steps": 4})
    assert (video == ref).all()
    assert [to for _, to in seq.switches] == ["text_encoder", "transformer", "transformer_2", "vae"]


def test_budget_without_cuda_is_refused_before_loading(files, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the budget was checked")

    monkeypatch.setattr("ggufvideo.building.from_gguf", refuse)
    with pytest.raises(PipelineError, match=r"vram_budget='1GiB' streams weights to a CUDA GPU, "
                                            r"but the device is 'cpu'"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], device="cpu", vram_budget="1GiB")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="CUDA is not available"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], vram_budget="1GiB")
    with pytest.raises(ValueError, match="expected bytes or a size"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], vram_budget="lots")


def test_sequence_without_cuda_names_the_module(files):
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"])
    with pytest.raises(RuntimeError, match=r"ggufvideo.runtime.sequence: a VRAM budget streams "
                                           r"weights to a CUDA GPU, but the device is 'cpu'"):
        stream_pipeline(pipe, "cpu", "1GiB")


def test_offload_to_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"ggufvideo.offload: device 'cuda' but CUDA is not "
                                           "available"):
        ggufvideo.offload(torch.nn.Linear(4, 4), "cuda", budget="1GiB")


def test_parts_with_diffusers_offload_hooks_are_refused(files):
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"])
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ValueError, match="the transformer already has an accelerate/diffusers "
                                         "offload hook"):
        stream_pipeline(pipe, "cpu", "1GiB", backend=lambda d: RecordingBackend())
    assert not hasattr(pipe.text_encoder, "_hf_hook")  # nothing was half installed


def test_generate_cli_vram_budget_without_cuda(files, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["generate", "--model", files["transformer"], "--text-encoder",
               files["text_encoder"], "--vae", files["vae"], "--prompt", "a cat", "--frames", "5",
               "--height", "32", "--width", "32", "--steps", "1", "--vram-budget", "2GiB",
               "--output", str(tmp_path / "out.mp4")])
    assert rc == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pipeline_with_budget_matches_resident(files):
    kw = dict(transformer=files["transformer"], text_encoder=files["text_encoder"],
              vae=files["vae"], dtype="float32")
    ref = generate(pipeline(**kw, device="cuda"), "a cat", **GEN)
    pipe = pipeline(**kw, vram_budget=_budget(pipeline(**kw)))
    video = generate(pipe, "a cat", **GEN)
    assert abs(video - ref).max() < 1e-4
    assert [to for _, to in pipe._ggufvideo_stream.switches] == ["text_encoder", "transformer",
                                                                  "vae"]
