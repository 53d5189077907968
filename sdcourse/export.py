"""Merging models and exporting them to the formats other tools load.

- ``merge_pipelines``: a checkpoint merge is a weighted sum of weights, tensor by tensor
  (``0.7 * A + 0.3 * B``), or "add difference" (``A + alpha * (B - C)``: B's change from C, grafted
  onto A). Works on diffusers pipeline folders, component by component; any two models of one
  architecture, the learner's fine-tune and someone else's alike.
- ``block_weighted_sum``: the same with one ratio per UNet block (the web UI's "merge block weighted"),
  in diffusers' block names or the web UI's 25 values IN00-IN11, M00, OUT00-OUT11.
- ``export_single_file``: one ``.safetensors`` file with the original Stable Diffusion ("LDM") key
  names, the format the AUTOMATIC1111 web UI, ComfyUI and ``StableDiffusionPipeline.from_single_file``
  load. diffusers only ships the opposite conversion, so the key mapping is written out here from the
  UNet's and VAE's configs (any number of blocks and layers, SD 1.x and 2.x).

Everything is read and written as safetensors; files appear under their final name only when complete.
Weights are read through the models (``from_pretrained``), never raw from the files: the hub's SD 1.x/2.x
VAEs store old attention names (``query``, ``key``, ``value``, ``proj_attn``) and its text encoders a
``text_model.`` prefix, which diffusers and transformers translate on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .runtime import atomic_dir

COMPONENT_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                     "text_encoder": "model.safetensors"}


STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def load_model(pipeline_dir: str | Path, component: str) -> torch.nn.Module:
    """A component as its model class loads it (safetensors only, never pickle), in the dtype it is stored in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(pipeline_dir) / component / COMPONENT_WEIGHTS[component]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: expected a diffusers pipeline folder saved with safetensors "
                                f"(save_pretrained(..., safe_serialization=True)).")
    with safe_open(path, "pt") as f:  # reads the header only
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    dtype = next((STORED_DTYPES[d] for d in ("F32", "BF16", "F16") if d in stored), torch.float32)
    model_class = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component]
    return model_class.from_pretrained(pipeline_dir, subfolder=component, torch_dtype=dtype, use_safetensors=True)


def load_component(pipeline_dir: str | Path, component: str) -> dict[str, torch.Tensor]:
    """A component's weights as a state dict, with the names the model gives them on load."""
    return load_model(pipeline_dir, component).state_dict()


def _config(pipeline_dir: str | Path, component: str) -> dict:
    return json.loads((Path(pipeline_dir) / component / "config.json").read_text())


# --- Merging -----------------------------------------------------------------------------------

def check_same_architecture(state_dicts: list[dict[str, torch.Tensor]], names: list[str] | None = None) -> None:
    """Raise ``ValueError`` unless every state dict has the first one's layers with the same shapes; the
    message names the layers that differ (an SD 1.x UNet reads 768-wide text, an SD 2.x one 1024-wide)."""
    names = names or [f"model {i}" for i in range(len(state_dicts))]
    first = state_dicts[0]
    for name, other in zip(names[1:], state_dicts[1:]):
        only_here, only_first = sorted(other.keys() - first.keys()), sorted(first.keys() - other.keys())
        if only_here or only_first:
            raise ValueError(f"{name} has different layers from {names[0]}: {len(only_here)} only in {name} "
                             f"(e.g. {only_here[:2]}), {len(only_first)} only in {names[0]} (e.g. {only_first[:2]}). "
                             "Only models of the same architecture can be merged (SD 1.x with SD 1.x, SD 2.x with SD 2.x).")
        shapes = [(k, tuple(t.shape), tuple(first[k].shape)) for k, t in other.items() if t.shape != first[k].shape]
        if shapes:
            key, here, there = shapes[0]
            more = f" (and {len(shapes) - 1} more layers of other shapes)" if len(shapes) > 1 else ""
            raise ValueError(f"{name}: {key} has shape {here}, {names[0]} has {there}{more}: only models of the same "
                             "architecture can be merged (SD 1.x with SD 1.x, SD 2.x with SD 2.x).")


def weighted_sum(state_dicts: list[dict[str, torch.Tensor]], weights: list[float],
                 names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * state_dicts[i], in fp32, each tensor returned in the first dict's dtype.

    Tensors that are not floating point (``position_ids``, counters) are indices, not weights: they
    are taken from the first dict (a float round trip would truncate 0.9 * 76 + 0.1 * 76 to 75).
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError(f"need one weight per model, got {len(state_dicts)} models and {len(weights)} weights")
    check_same_architecture(state_dicts, names)
    first = state_dicts[0]
    return {key: sum(w * sd[key].float() for sd, w in zip(state_dicts, weights)).to(first[key].dtype)
            if first[key].is_floating_point() else first[key].clone() for key in first}


def add_difference(a: dict, b: dict, c: dict, alpha: float) -> dict[str, torch.Tensor]:
    """A + alpha * (B - C): what fine-tuning C into B learned, added to A."""
    return weighted_sum([a, b, c], [1.0, alpha, -alpha])


# --- Block-weighted merges: one ratio per UNet block -----------------------------------------------
#
# Two block schemes name the same UNet. diffusers': down_blocks.0..3, mid_block, up_blocks.0..3 (9 for SD 1.x).
# The web UI's merge-block-weighted ("MBW") scheme counts the original code's blocks: IN00-IN11, M00,
# OUT00-OUT11, 25 for SD 1.x. There IN00 is conv_in; each further IN is one resnet with its attention,
# or a downsampler (IN03, IN06, IN09); OUT02, OUT05 and OUT08 hold an upsampler too. The mapping is the
# single-file export's key mapping below (``_unet_prefixes``), so it follows any SD 1.x/2.x config. The
# time embedding and the output layers (conv_norm_out, conv_out; in diffusers' scheme also conv_in) belong
# to no block: they take ``base``, the ratio of the whole merge, as does the web UI's "base alpha".

def unet_block_names(config: dict, scheme: str = "diffusers") -> list[str]:
    """The blocks of a UNet config, in order, in the "diffusers" or the web UI's "mbw" scheme."""
    n = len(config["block_out_channels"])
    if scheme == "diffusers":
        return [f"down_blocks.{b}" for b in range(n)] + ["mid_block"] + [f"up_blocks.{b}" for b in range(n)]
    if scheme == "mbw":
        per_side = n * (config["layers_per_block"] + 1)
        return [f"IN{i:02d}" for i in range(per_side)] + ["M00"] + [f"OUT{i:02d}" for i in range(per_side)]
    raise ValueError(f"scheme {scheme!r}: choose 'diffusers' or 'mbw'")


def unet_block_of(key: str, config: dict, scheme: str = "diffusers") -> str | None:
    """The block a diffusers UNet key belongs to (``unet_block_names``), None for the layers outside every block."""
    if scheme == "diffusers":
        parts = key.split(".")
        return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else (
            "mid_block" if parts[0] == "mid_block" else None)
    kind, number = _rename(key, _unet_prefixes(config), []).split(".")[:2]
    if kind == "input_blocks":
        return f"IN{int(number):02d}"
    if kind == "output_blocks":
        return f"OUT{int(number):02d}"
    return "M00" if kind == "middle_block" else None


def block_ratios(config: dict, ratios, base: float = 0.5) -> tuple[str, dict[str, float]]:
    """(scheme, {block: ratio}) from what a learner writes: a dict by block name (blocks left out take
    ``base``), or one value per block in order, as a list or the web UI's comma-separated string, in
    either scheme (9 or 25 values for SD 1.x; 26 with the base ratio first, as supermerger writes it)."""
    schemes = {s: unet_block_names(config, s) for s in ("diffusers", "mbw")}
    if isinstance(ratios, dict):
        scheme = "mbw" if set(ratios) <= set(schemes["mbw"]) else "diffusers"
        unknown = sorted(set(ratios) - set(schemes[scheme]))
        if unknown:
            raise ValueError(f"unknown UNet blocks {unknown}; this UNet's blocks are {', '.join(schemes['diffusers'])} "
                             f"or, in the web UI's scheme, {', '.join(schemes['mbw'])}")
        return scheme, {name: float(ratios.get(name, base)) for name in schemes[scheme]}
    values = [float(v) for v in (ratios.split(",") if isinstance(ratios, str) else ratios)]
    for scheme, names in schemes.items():
        if len(values) == len(names):
            return scheme, dict(zip(names, values))
    if len(values) == len(schemes["mbw"]) + 1:
        return "mbw", dict(zip(schemes["mbw"], values[1:]))
    raise ValueError(f"{len(values)} block ratios: this UNet has {len(schemes['diffusers'])} blocks "
                     f"({', '.join(schemes['diffusers'])}) or {len(schemes['mbw'])} in the web UI's scheme "
                     f"(IN00-{schemes['mbw'][len(schemes['mbw']) // 2 - 1]}, M00, OUT00-{schemes['mbw'][-1]})")


def block_weighted_sum(a: dict, b: dict, ratios, config: dict, base: float = 0.5,
                       names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Two UNets merged block by block: ``(1 - r) * A + r * B`` with each block's ratio r (``block_ratios``;
    0 keeps A's block, 1 takes B's), ``base`` for the layers outside the blocks."""
    check_same_architecture([a, b], names)
    scheme, per_block = block_ratios(config, ratios, base)
    merged = {}
    for key, tensor in a.items():
        if not tensor.is_floating_point():
            merged[key] = tensor.clone()
            continue
        block = unet_block_of(key, config, scheme)
        r = base if block is None else per_block[block]
        merged[key] = ((1 - r) * tensor.float() + r * b[key].float()).to(tensor.dtype)
    return merged


def merge_pipelines(pipeline_dirs: list[str | Path], weights: list[float], out_dir: str | Path,
                    components: tuple[str, ...] = ("unet", "text_encoder", "vae"), unet_ratios=None) -> Path:
    """Weighted merge of diffusers pipeline folders of one architecture into ``out_dir``.

    Scheduler, tokenizer and configs come from the first folder. Components whose weights are equal
    in all folders (a frozen VAE, say) come out unchanged. Each merged component is written by its
    model's ``save_pretrained``, in the first folder's dtype, with the names the installed libraries write.
    ``unet_ratios`` (two folders, ``weights`` = [1 - r, r]): the UNet merged block by block
    (``block_weighted_sum``, with r for the layers outside the blocks), the rest by ``weights``.
    """
    out_dir = Path(out_dir)
    if unet_ratios is not None and len(pipeline_dirs) != 2:
        raise ValueError(f"a block-weighted merge takes two models, got {len(pipeline_dirs)}")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(pipeline_dirs[0], tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
        for component in components:
            first = load_model(pipeline_dirs[0], component)
            others = [load_component(d, component) for d in pipeline_dirs[1:]]
            names = [f"{d}/{component}" for d in pipeline_dirs]
            if component == "unet" and unet_ratios is not None:
                merged = block_weighted_sum(first.state_dict(), others[0], unet_ratios, dict(first.config),
                                            base=weights[1], names=names)
            else:
                merged = weighted_sum([first.state_dict(), *others], weights, names)
            first.load_state_dict(merged)
            first.save_pretrained(tmp / component, safe_serialization=True)
            del first, others, merged
        record = {"models": [str(d) for d in pipeline_dirs], "weights": weights, "components": list(components)}
        if unet_ratios is not None:
            record["unet_blocks"] = block_ratios(_config(pipeline_dirs[0], "unet"), unet_ratios, weights[1])[1]
        (tmp / "merge.json").write_text(json.dumps(record, indent=2))
    return out_dir


# --- diffusers -> original Stable Diffusion (LDM) key names ----------------------------------------

UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
VAE_TOP = {"conv_norm_out": "norm_out"}


def _unet_prefixes(config: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every block of a UNet2DConditionModel config."""
    per_block = config["layers_per_block"]
    n_blocks = len(config["block_out_channels"])
    prefixes = [(f"{k}.", f"{v}.", False) for k, v in UNET_TOP.items()]
    for b in range(n_blocks):
        for j in range(per_block):
            ldm = 1 + b * (per_block + 1) + j
            prefixes += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{ldm}.0.", True),
                         (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{ldm}.1.", False)]
        prefixes.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (per_block + 1)}.0.op.", False))
        has_attention = "CrossAttn" in config["up_block_types"][b]
        for j in range(per_block + 1):
            ldm = b * (per_block + 1) + j
            prefixes += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{ldm}.0.", True),
                         (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{ldm}.1.", False)]
        last = b * (per_block + 1) + per_block
        prefixes.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}.", False))
    prefixes += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
                 ("mid_block.resnets.1.", "middle_block.2.", True)]
    return prefixes


def _rename(key: str, prefixes: list[tuple[str, str, bool]], inner: list[tuple[str, str]]) -> str:
    for hf, ldm, is_resnet in prefixes:
        if key.startswith(hf):
            rest = key[len(hf):]
            if is_resnet:
                for a, b in inner:
                    rest = rest.replace(a, b)
            return ldm + rest
    raise KeyError(f"no original Stable Diffusion name known for {key!r}: is this a Stable Diffusion 1.x/2.x model?")


def unet_to_ldm(state_dict: dict, config: dict) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    return {"model.diffusion_model." + _rename(k, prefixes, UNET_RESNET): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: dict, config: dict) -> dict[str, torch.Tensor]:
    n_blocks = len(config["block_out_channels"])
    prefixes = []
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.{k}.", f"{part}.{v}.", False) for k, v in VAE_TOP.items()]
        prefixes += [(f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}.", True) for i in range(2)]
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", True))
    for b in range(n_blocks):
        prefixes += [(f"encoder.down_blocks.{b}.resnets.", f"encoder.down.{b}.block.", True),
                     (f"encoder.down_blocks.{b}.downsamplers.0.", f"encoder.down.{b}.downsample.", False),
                     # the original decoder numbers its blocks from the bottom up
                     (f"decoder.up_blocks.{b}.resnets.", f"decoder.up.{n_blocks - 1 - b}.block.", True),
                     (f"decoder.up_blocks.{b}.upsamplers.0.", f"decoder.up.{n_blocks - 1 - b}.upsample.", False)]
    out = {}
    for key, value in state_dict.items():
        if key.split(".")[0] in ("quant_conv", "post_quant_conv") or key.split(".")[1] in ("conv_in", "conv_out"):
            out["first_stage_model." + key] = value
            continue
        new = _rename(key, prefixes, [("conv_shortcut", "nin_shortcut")] + VAE_ATTENTION)
        if ".mid.attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions, not linear layers
        out["first_stage_model." + new] = value
    return out


OPENCLIP_RENAMES = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
                    (".self_attn.out_proj.", ".attn.out_proj.")]
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}


def text_encoder_to_ldm(state_dict: dict, open_clip: bool) -> dict[str, torch.Tensor]:
    """SD 1.x keeps the Hugging Face CLIP names under ``cond_stage_model.transformer.``; SD 2.x's
    OpenCLIP fuses q, k and v into one ``in_proj`` matrix per layer."""
    # transformers 5 saves CLIPTextModel without the "text_model." prefix that 4.x and the originals use.
    state_dict = {"text_model." + k.removeprefix("text_model."): v for k, v in state_dict.items()
                  if not k.endswith("position_ids")}
    if not open_clip:
        return {"cond_stage_model.transformer." + k: v for k, v in state_dict.items()}
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".self_attn.{proj}." in key:
                layer, kind = key.split(f".self_attn.{proj}.")
                qkv.setdefault((layer, kind), {})[proj] = value
                break
        else:
            for a, b in OPENCLIP_RENAMES:
                key = key.replace(a, b)
            out[key] = value
    for (layer, kind), parts in qkv.items():
        for a, b in OPENCLIP_RENAMES:
            layer = layer.replace(a, b)
        out[f"{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def export_single_file(pipeline_dir: str | Path, out_file: str | Path, half: bool = True) -> Path:
    """Write a diffusers pipeline folder as one original-format ``.safetensors`` checkpoint.

    Load it in the AUTOMATIC1111 web UI or ComfyUI (models/Stable-diffusion, models/checkpoints) or with
    ``StableDiffusionPipeline.from_single_file``. SD 2.x v-prediction models also need the
    ``v2-inference-v.yaml`` config beside them in the web UI, named like the checkpoint.
    """
    pipeline_dir, out_file = Path(pipeline_dir), Path(out_file)
    text_config = _config(pipeline_dir, "text_encoder")
    # OpenCLIP's text tower (SD 2.x) uses GELU; OpenAI's CLIP (SD 1.x) uses quick_gelu.
    open_clip = text_config.get("hidden_act") == "gelu"
    state = {**unet_to_ldm(load_component(pipeline_dir, "unet"), _config(pipeline_dir, "unet")),
             **vae_to_ldm(load_component(pipeline_dir, "vae"), _config(pipeline_dir, "vae")),
             **text_encoder_to_ldm(load_component(pipeline_dir, "text_encoder"), open_clip)}
    dtype = torch.float16 if half else torch.float32
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    save_file(state, tmp, metadata={"format": "pt", "exported_by": "sdcourse",
                                    "prediction_type": _scheduler_prediction_type(pipeline_dir)})
    os.replace(tmp, out_file)
    return out_file


def _scheduler_prediction_type(pipeline_dir: Path) -> str:
    config = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    return config.get("prediction_type", "epsilon")
