"""HunyuanVideo transformer: T2V (guidance-distilled), I2V (33-channel latent concat, 16-channel
token replace), and checkpoints without a guidance embedder (SkyReels-style fine-tunes).

Layouts: diffusers' (``HunyuanVideoTransformer3DModel``) and the release's, which the shared GGUFs
(``general.architecture = hyvid``) use: ``double_blocks`` / ``single_blocks``, ``txt_in`` with its
``individual_token_refiner``, ``img_in``/``time_in``/``vector_in``/``guidance_in``, ``final_layer``;
and ``"comfyui"``, the release's names as ComfyUI's own module spells them (``img_attn.qkv``,
``img_mod.lin``, ``img_mlp.0``, ``norm.query_norm.scale``...), which checkpoints and LoRAs saved
from ComfyUI carry.
The release fuses what diffusers keeps apart:

* ``img_attn_qkv`` / ``txt_attn_qkv`` / the refiner's ``self_attn_qkv``: q, k, v as three equal row
  blocks;
* ``single_blocks.N.linear1``: q, k, v (``hidden`` rows each) then the MLP's input projection (the
  rest), ``hidden`` being the rows of the block's ``linear2``;
* ``final_layer.adaLN_modulation.1``: shift then scale, diffusers' ``norm_out.linear`` scale then
  shift.

Config from shapes: the patch embedding gives width, input channels and patch sizes; the q/k norms
(per head) give the head width -- 128 in the release, assumed when a file has no q/k norms. A
33-channel input with 16 output channels is the I2V model's latent concatenation
(``image_condition_type="latent_concat"``). The 16-channel I2V model (``"token_replace"``) has
exactly T2V's tensors; it is reported as T2V (set ``image_condition_type`` by hand for it). RoPE
axes are not in any shape: diffusers' default ``(16, 56, 56)`` (the release's) is kept.
FramePack's transformer (``HunyuanVideoFramepackTransformer3DModel``; diffusers' layout only, as
its weights are shared) is told by its ``image_projection`` / ``clean_x_embedder``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import Family, Rule, Shapes, rename

#: Head width of the released HunyuanVideo models (used when no q/k norm tells it).
HEAD_DIM = 128


def _single_linear1_sizes(total: int, c: Mapping[str, str], rows_of: Any) -> Sequence[int]:
    """q, k, v, mlp rows of ``single_blocks.{i}.linear1``: hidden = rows of the block's linear2."""
    hidden = rows_of(f"single_blocks.{c['i']}.linear2.weight")
    if hidden is None:
        mod = (rows_of(f"single_blocks.{c['i']}.modulation.linear.weight")
               or rows_of(f"single_blocks.{c['i']}.modulation.lin.weight"))  # (ComfyUI's name)
        hidden = mod // 3 if mod is not None else None
    if hidden is None:  # no way to tell: let the split report it
        return (total, 0, 0, 0)
    return (hidden, hidden, hidden, total - 3 * hidden)


def _qkv(orig: str, diff: str, names: tuple[str, str, str]) -> Rule:
    return Rule((f"{orig}.*",), tuple(f"{diff}.{n}.*" for n in names))


_DOUBLE = "double_blocks.{i}"
_DDOUBLE = "transformer_blocks.{i}"
_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
_DREFINER = "context_embedder.token_refiner.refiner_blocks.{i}"
_SINGLE = "single_blocks.{i}"
_DSINGLE = "single_transformer_blocks.{i}"

RULES: tuple[Rule, ...] = (
    rename("img_in.*", "x_embedder.*"),
    rename("time_in.mlp.0.*", "time_text_embed.timestep_embedder.linear_1.*"),
    rename("time_in.mlp.2.*", "time_text_embed.timestep_embedder.linear_2.*"),
    rename("guidance_in.mlp.0.*", "time_text_embed.guidance_embedder.linear_1.*"),
    rename("guidance_in.mlp.2.*", "time_text_embed.guidance_embedder.linear_2.*"),
    rename("vector_in.in_layer.*", "time_text_embed.text_embedder.linear_1.*"),
    rename("vector_in.out_layer.*", "time_text_embed.text_embedder.linear_2.*"),
    # text token refiner
    rename("txt_in.input_embedder.*", "context_embedder.proj_in.*"),
    rename("txt_in.t_embedder.mlp.0.*",
           "context_embedder.time_text_embed.timestep_embedder.linear_1.*"),
    rename("txt_in.t_embedder.mlp.2.*",
           "context_embedder.time_text_embed.timestep_embedder.linear_2.*"),
    rename("txt_in.c_embedder.*", "context_embedder.time_text_embed.text_embedder.*"),
    _qkv(f"{_REFINER}.self_attn_qkv", f"{_DREFINER}.attn", ("to_q", "to_k", "to_v")),
    rename(f"{_REFINER}.self_attn_proj.*", f"{_DREFINER}.attn.to_out.0.*"),
    rename(f"{_REFINER}.mlp.fc1.*", f"{_DREFINER}.ff.net.0.proj.*"),
    rename(f"{_REFINER}.mlp.fc2.*", f"{_DREFINER}.ff.net.2.*"),
    rename(f"{_REFINER}.adaLN_modulation.1.*", f"{_DREFINER}.norm_out.linear.*"),
    rename(f"{_REFINER}.norm1.*", f"{_DREFINER}.norm1.*"),
    rename(f"{_REFINER}.norm2.*", f"{_DREFINER}.norm2.*"),
    # dual-stream blocks
    rename(f"{_DOUBLE}.img_mod.linear.*", f"{_DDOUBLE}.norm1.linear.*"),
    rename(f"{_DOUBLE}.txt_mod.linear.*", f"{_DDOUBLE}.norm1_context.linear.*"),
    _qkv(f"{_DOUBLE}.img_attn_qkv", f"{_DDOUBLE}.attn", ("to_q", "to_k", "to_v")),
    _qkv(f"{_DOUBLE}.txt_attn_qkv", f"{_DDOUBLE}.attn",
         ("add_q_proj", "add_k_proj", "add_v_proj")),
    rename(f"{_DOUBLE}.img_attn_q_norm.*", f"{_DDOUBLE}.attn.norm_q.*"),
    rename(f"{_DOUBLE}.img_attn_k_norm.*", f"{_DDOUBLE}.attn.norm_k.*"),
    rename(f"{_DOUBLE}.txt_attn_q_norm.*", f"{_DDOUBLE}.attn.norm_added_q.*"),
    rename(f"{_DOUBLE}.txt_attn_k_norm.*", f"{_DDOUBLE}.attn.norm_added_k.*"),
    rename(f"{_DOUBLE}.img_attn_proj.*", f"{_DDOUBLE}.attn.to_out.0.*"),
    rename(f"{_DOUBLE}.txt_attn_proj.*", f"{_DDOUBLE}.attn.to_add_out.*"),
    rename(f"{_DOUBLE}.img_mlp.fc1.*", f"{_DDOUBLE}.ff.net.0.proj.*"),
    rename(f"{_DOUBLE}.img_mlp.fc2.*", f"{_DDOUBLE}.ff.net.2.*"),
    rename(f"{_DOUBLE}.txt_mlp.fc1.*", f"{_DDOUBLE}.ff_context.net.0.proj.*"),
    rename(f"{_DOUBLE}.txt_mlp.fc2.*", f"{_DDOUBLE}.ff_context.net.2.*"),
    # single-stream blocks
    Rule((f"{_SINGLE}.linear1.*",),
         tuple(f"{_DSINGLE}.{n}.*" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
         sizes=_single_linear1_sizes),
    rename(f"{_SINGLE}.linear2.*", f"{_DSINGLE}.proj_out.*"),
    rename(f"{_SINGLE}.q_norm.*", f"{_DSINGLE}.attn.norm_q.*"),
    rename(f"{_SINGLE}.k_norm.*", f"{_DSINGLE}.attn.norm_k.*"),
    rename(f"{_SINGLE}.modulation.linear.*", f"{_DSINGLE}.norm.linear.*"),
    # output
    Rule(("final_layer.adaLN_modulation.1.*",), ("norm_out.linear.*",), swap_halves=True),
    rename("final_layer.linear.*", "proj_out.*"),
)


#: The release's names as ComfyUI's own HunyuanVideo module writes them (it reuses Flux's
#: blocks): what a checkpoint or LoRA saved from ComfyUI carries. ComfyUI renames the release's
#: names into these on load, by these substitutions on the key; q/k norm weights become
#: ``.norm.query_norm.scale`` / ``.norm.key_norm.scale`` (see :func:`_comfyui_rule`).
_COMFYUI_SUBSTITUTIONS = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."),
    ("_attn_qkv.", "_attn.qkv."),
    ("mlp.fc1.", "mlp.0."),
    ("mlp.fc2.", "mlp.2."),
    ("_attn_proj.", "_attn.proj."),
    (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.0.", "_in.in_layer."),
    ("_in.mlp.2.", "_in.out_layer."),
)
_COMFYUI_NORMS = (("_attn_q_norm.*", "_attn.norm.query_norm.scale"),
                  ("_attn_k_norm.*", "_attn.norm.key_norm.scale"),
                  (".q_norm.*", ".norm.query_norm.scale"),
                  (".k_norm.*", ".norm.key_norm.scale"))


def _comfyui_rule(rule: Rule) -> tuple[Rule, ...]:
    """``rule`` (release names <-> diffusers') with the release side in ComfyUI's names."""
    (other, *more) = rule.other
    for tail, spelled in _COMFYUI_NORMS:
        if other.endswith(tail) and not more:  # a norm's one weight, renamed "scale"
            base = other[:-len(tail)] + spelled
            return (Rule((base,), tuple(d[:-1] + "weight" for d in rule.diffusers)),)
    if other == "txt_in.c_embedder.*":  # linear_1/_2 in the release, in_layer/out_layer here
        d = "context_embedder.time_text_embed.text_embedder"
        return (rename("txt_in.c_embedder.in_layer.*", f"{d}.linear_1.*"),
                rename("txt_in.c_embedder.out_layer.*", f"{d}.linear_2.*"))

    def comfy(t: str) -> str:
        for a, b in _COMFYUI_SUBSTITUTIONS:
            t = t.replace(a, b)
        return t

    return (Rule(tuple(comfy(t) for t in rule.other), rule.diffusers, sizes=rule.sizes,
                 swap_halves=rule.swap_halves, when=rule.when, rows=rule.rows),)


COMFYUI_RULES: tuple[Rule, ...] = tuple(r for rule in RULES for r in _comfyui_rule(rule))


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``HunyuanVideoTransformer3DModel`` config from the tensors' shapes."""
    inner, in_channels, patch_t, patch, _ = s.require("x_embedder.proj.weight",
                                                      "the model width and patch size", ndim=5)
    num_layers = s.count("transformer_blocks.{i}.*")
    num_single = s.count("single_transformer_blocks.{i}.*")
    if num_layers + num_single == 0:
        s.require("transformer_blocks.0.attn.to_q.weight", "the number of layers")
    first = "transformer_blocks.0" if num_layers else "single_transformer_blocks.0"
    norm_q = s.get(f"{first}.attn.norm_q.weight")
    head_dim = norm_q[0] if norm_q else HEAD_DIM
    if inner % head_dim:
        head_dim = inner
    mlp_key = ("transformer_blocks.0.ff.net.0.proj.weight" if num_layers
               else "single_transformer_blocks.0.proj_mlp.weight")
    mlp = s.require(mlp_key, "the MLP ratio", ndim=2)[0]
    out_rows = s.require("proj_out.weight", "the output channels", ndim=2)[0]
    out_channels = out_rows // (patch_t * patch * patch)
    text = s.require("context_embedder.proj_in.weight", "the text embedding width", ndim=2)
    pooled = s.require("time_text_embed.text_embedder.linear_1.weight",
                       "the pooled text embedding width", ndim=2)
    qk_norm = None
    if norm_q:
        qk_norm = "layer_norm" if s.has(f"{first}.attn.norm_q.bias") else "rms_norm"
    config: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": num_layers,
        "num_single_layers": num_single,
        "num_refiner_layers": s.count("context_embedder.token_refiner.refiner_blocks.{i}.*"),
        "mlp_ratio": mlp / inner,
        "patch_size": patch,
        "patch_size_t": patch_t,
        "qk_norm": qk_norm,
        "guidance_embeds": s.has("time_text_embed.guidance_embedder.linear_1.weight"),
        "text_embed_dim": text[1],
        "pooled_projection_dim": pooled[1],
        "image_condition_type": ("latent_concat" if in_channels == 2 * out_channels + 1
                                 else None),
    }
    if s.any("image_projection.*") or s.any("clean_x_embedder.*"):  # FramePack
        image = s.get("image_projection.up.weight")
        config.update(has_image_proj=image is not None, has_clean_x_embedder=s.any(
            "clean_x_embedder.*"), **({"image_proj_dim": image[1]} if image else {}))
    return config


def class_name(config: Mapping[str, Any]) -> str:
    if "has_clean_x_embedder" in config:
        return "HunyuanVideoFramepackTransformer3DModel"
    return "HunyuanVideoTransformer3DModel"


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    size = ("13B" if (dim, config["num_layers"], config["num_single_layers"]) == (3072, 20, 40)
            else f"dim {dim}, {config['num_layers']}+{config['num_single_layers']} layers")
    if "has_clean_x_embedder" in config:
        return f"FramePack I2V {size}"
    if config["image_condition_type"] == "latent_concat":
        return f"I2V {size} ({config['in_channels']}-channel latent concat)"
    if config["in_channels"] != config["out_channels"]:
        return f"I2V {size} ({config['in_channels']} input channels)"
    if config["guidance_embeds"]:
        return f"T2V {size} (guidance-distilled; the 16-channel I2V has the same tensors)"
    return f"T2V {size} (no guidance embedder)"


FAMILY: Family[Any] = Family(
    name="hunyuan-video",
    title="HunyuanVideo transformer",
    kind="transformer",
    architectures=("hyvid", "hunyuan-video", "hunyuanvideo"),
    signatures={
        "diffusers": (("x_embedder.proj.weight", "context_embedder.proj_in.weight",
                       "time_text_embed.timestep_embedder.linear_1.weight"),),
        # (before "original": ComfyUI's names share the release's embedders)
        # (img_in.proj: HunyuanVideo's patch embedding; Flux, whose blocks ComfyUI names alike,
        # has img_in as a plain linear)
        "comfyui": (("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight",
                     "img_in.proj.weight"),
                    ("single_blocks.0.modulation.lin.weight", "img_in.proj.weight")),
        "original": (("img_in.proj.weight", "txt_in.input_embedder.weight"),
                     ("double_blocks.0.img_attn_qkv.weight",
                      "double_blocks.0.img_mod.linear.weight")),
    },
    rules={"original": RULES, "comfyui": COMFYUI_RULES},
    unsupported={"byt5_in.*": "HunyuanVideo 1.5", "cond_type_embedding.*": "HunyuanVideo 1.5",
                 "double_blocks.{i}.img_attn_q.*": "HunyuanVideo 1.5"},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
)
