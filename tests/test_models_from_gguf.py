"""Every family end to end: a tiny model saved as GGUF in each of its layouts comes back from
``from_gguf`` as the same diffusers class with the same weights, bit for bit (quantized ones as the
same raw blocks), whichever layout the file used."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

pytest.importorskip("diffusers")

from family_checks import random_state_dict  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGMLTensor  # noqa: E402
from ggufvideo.models import CANONICAL, families, get_family  # noqa: E402
from ggufvideo.models.tensors import TensorOps  # noqa: E402

# (family, test module, builder argument) -- a tiny model of each family from its own tests
CASES = [
    ("wan", "test_models_wan", "i2v-2.1"),
    ("wan", "test_models_wan", "vace"),
    ("wan-vae", "test_models_wan_vae", "2.1"),
    ("wan-vae", "test_models_wan_vae", "2.2"),
    ("hunyuan-video", "test_models_hunyuan_video", None),
    ("hunyuan-video-vae", "test_models_hunyuan_vae", None),
    ("ltx-video", "test_models_ltx_video", None),
    ("ltx-video-vae", "test_models_ltx_vae", None),
    ("cogvideox", "test_models_cogvideox", None),
    ("mochi", "test_models_mochi", 2),
]


POLICY = dataclasses.replace(ggufvideo.QuantPolicy.from_type("Q8_0", min_elements=0),
                             keep_patterns=())


# Settings no shape tells, that the tiny test models do not share with the releases
OVERRIDES = {"hunyuan-video-vae": {"norm_num_groups": 4}}


def _model(module: str, arg):
    mod = importlib.import_module(module)
    if arg is None:
        arg = next(iter(mod.VARIANTS))
    return mod.build(arg)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


# Text encoders (transformers classes) are tested end to end in their own modules, against
# transformers' own GGUF loader on llama.cpp-named files.
TESTED_ELSEWHERE = {"t5-encoder": "test_models_t5_encoder",
                    "llama-text-encoder": "test_models_llama_encoder",
                    # (from a single file, bit for bit against transformers' own model)
                    "clip-vision": "test_pipeline_parts"}


def test_every_family_is_covered():
    assert {f for f, _, _ in CASES} | set(TESTED_ELSEWHERE) == set(families())


@pytest.mark.parametrize("family,module,arg", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_from_gguf_gives_the_same_model_from_every_layout(family, module, arg, tmp_path):
    fam = get_family(family)
    model = _model(module, arg)
    sd = random_state_dict(model)
    loaded = {}
    for layout in fam.layouts:
        try:
            named = fam.convert(sd, CANONICAL, layout, TensorOps())
        except ggufvideo.ModelLoadError:
            continue  # a release layout that cannot hold this variant (e.g. another VAE version)
        if fam.layout_of(set(named)) != layout and layout != CANONICAL:
            continue  # this variant's names read as another release layout of the family
        path = tmp_path / f"{layout}.gguf"
        # every tensor whose rows fit is quantized, tiny ones too: a fused tensor and its parts
        # must get the same type for the files to be comparable
        ggufvideo.save_state_dict(named, path, policy=POLICY)
        m = ggufvideo.from_gguf(path, config=OVERRIDES.get(family))
        assert type(m) is type(model), layout
        loaded[layout] = _weights(m)
    assert CANONICAL in loaded and len(loaded) >= (2 if len(fam.layouts) > 1 else 1)
    ref = loaded[CANONICAL]
    for layout, weights in loaded.items():
        assert set(weights) == set(ref), layout
        for k, v in ref.items():
            w = weights[k]
            if isinstance(v, GGMLTensor):
                assert isinstance(w, GGMLTensor) and w.qtype == v.qtype, (layout, k)
                assert torch.equal(w.raw, v.raw), (layout, k)
            else:
                assert torch.equal(w, v), (layout, k)
