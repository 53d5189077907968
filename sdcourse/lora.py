"""LoRA: train a small low-rank update of the UNet's attention layers instead of the whole UNet.

Each attention projection W (to_q, to_k, to_v, to_out) gets a trainable W + B·A, with A of shape
[rank, in] and B of shape [out, rank]; W itself stays frozen. At rank 8 that is 1.6 million parameters,
0.2 % of SD 1.5's UNet (counted in notebook 06), so gradients and optimizer states almost vanish and the
result is a file of a few megabytes that loads on top of the base model (Hu et al. 2021). peft implements the
layers; diffusers loads and saves them. ``add_lora`` fixes the scale alpha/rank to 1 (alpha = rank); ``save_lora``
keeps alpha and rank with the weights, so ``fuse_into`` and ``export_kohya`` scale a LoRA made otherwise right too.

LoRAs stack: ``apply_lora_tags`` reads a prompt's ``<lora:name:weight>`` tags as the web UIs do and
weights those adapters; ``fuse_into`` folds one into a UNet's weights, a whole model to merge with others.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# LoCon ("LoRA for convolution", LyCORIS; kohya's conv_dim): also the ResNet blocks' 3x3 and 1x1
# convolutions and the down- and upsampling convolutions, where the UNet keeps its textures and
# spatial detail. A conv LoRA's A is a k x k convolution to ``rank`` channels, its B a 1x1 back.
CONV_TARGET_MODULES = ["conv1", "conv2", "conv_shortcut", "conv"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
# The LoraConfig settings that say what the saved weights mean (the scale alpha/rank, per module with the patterns),
# saved with them as diffusers' adapter metadata. Only these: every peft since 0.9 knows them, while the whole config
# of a newer peft has fields an older one refuses (diffusers builds LoraConfig(**metadata) when it loads).
ADAPTER_SETTINGS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora")


def add_lora(unet, rank: int, seed: int = 0, conv: bool = False) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add rank-``rank`` LoRA layers to its attention projections (and with ``conv``, LoCon,
    to its convolutions too); return the trainable parameters.

    A starts random (from ``seed``, so runs repeat), B at zero: the adapter changes nothing until it trains.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES + (CONV_TARGET_MODULES if conv else [])))
    return [p for p in unet.parameters() if p.requires_grad]


def has_conv_lora(unet) -> bool:
    return any(isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d) for m in unet.modules())


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet, folder: str | Path) -> Path:
    """Write the LoRA layers in diffusers' format: ``pipe.load_lora_weights(folder)`` loads them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().float().cpu().contiguous()
              for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}
    config = unet.peft_config["default"].to_dict()
    settings = {k: sorted(config[k]) if isinstance(config[k], set) else config[k] for k in ADAPTER_SETTINGS}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=settings)
    return Path(folder) / WEIGHT_NAME


def _unet_peft_state(folder: str | Path) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    saved = load_file(Path(folder) / WEIGHT_NAME)
    return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in saved.items() if k.startswith("unet.")})


def adapter_settings(folder: str | Path) -> dict:
    """The ``ADAPTER_SETTINGS`` that ``save_lora`` kept with the weights, for ``lora_scale``; {} for a file saved
    without them (older saves, other tools), which diffusers reads as alpha = rank. A DoRA is refused: its weights
    are not W + scale·B·A."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    file = Path(folder) / WEIGHT_NAME
    with safe_open(file, "pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    settings = {k.removeprefix("unet."): v for k, v in json.loads(raw).items() if k.startswith("unet.")} if raw else {}
    if settings.get("use_dora"):
        raise ValueError(f"{file} is a DoRA (use_dora): its weights are not W + B·A, so it cannot be fused or exported "
                         "here; load it with pipe.load_lora_weights instead")
    return settings


def lora_scale(settings: dict, module: str, rank: int) -> float:
    """What peft multiplies B·A by in ``module``: alpha / rank (alpha / sqrt(rank) with rsLoRA), alpha from the
    first ``alpha_pattern`` that names the module (peft's rule: the pattern matches the name's end), else
    ``lora_alpha``; without settings alpha = rank. The rank is the module's own (A's rows: ``rank_pattern`` applied)."""
    patterns = settings.get("alpha_pattern") or {}
    key = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
    alpha = patterns[key] if key is not None else settings.get("lora_alpha", rank)
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def load_lora_into(unet, folder: str | Path) -> None:
    """Load saved LoRA weights into a UNet that already has its adapter (resuming a LoRA run)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, _unet_peft_state(folder))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder}: LoRA weights that this UNet's adapter does not have, e.g. {unexpected[:2]}")


def export_kohya(folder: str | Path, out_file: str | Path) -> Path:
    """The LoRA in kohya's format, the one the AUTOMATIC1111 web UI and ComfyUI load (``<lora:name:0.8>``)."""
    from diffusers.utils import convert_state_dict_to_kohya

    layers, settings = _unet_peft_state(folder), adapter_settings(folder)
    state = convert_state_dict_to_kohya({"unet." + k: v for k, v in layers.items()})
    for key, down in layers.items():  # diffusers writes alpha = rank; the web UIs scale by alpha / rank
        if key.endswith(".lora_A.weight"):
            module, rank = key.removesuffix(".lora_A.weight"), down.shape[0]
            state[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(lora_scale(settings, module, rank) * rank)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    metadata = {"ss_network_module": "networks.lora"}
    down = {k: v for k, v in state.items() if k.endswith(".lora_down.weight")}
    conv_ranks = {v.shape[0] for v in down.values() if v.ndim == 4 and v.shape[-1] > 1}
    if conv_ranks:  # LoCon: kohya's networks.lora with conv_dim, which the web UIs read the same way
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(max(conv_ranks)), "conv_alpha": str(max(conv_ranks))})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    tmp.replace(out_file)
    return out_file


# --- Stacked LoRAs, written in the prompt as the web UIs do: "<lora:style:0.8>, <lora:subject:1>" ----------

LORA_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>")


def parse_lora_tags(prompt: str, known: Iterable[str] = ()) -> tuple[str, dict[str, float]]:
    """The prompt without its ``<lora:name:weight>`` tags, and {name: weight} in the order written.

    As in the AUTOMATIC1111 web UI, ``<lora:name>`` means weight 1 and the tags take no part in the text
    the text encoder reads. ``known``: the LoRA names there are; an unknown name is an error naming them.
    """
    known = list(known)
    weights: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        tag, name, weight = match.group(0), match.group(1).strip(), match.group(2)
        if not name:
            raise ValueError(f"{tag} in the prompt names no LoRA: write <lora:name:weight>, e.g. <lora:style:0.8>.")
        if known and name not in known:
            raise ValueError(f"{tag}: no LoRA named {name!r}; the LoRAs known here are {', '.join(known)}.")
        try:
            weights[name] = 1.0 if weight is None else float(weight)
        except ValueError:
            raise ValueError(f"{tag}: the weight {weight!r} is not a number; write e.g. <lora:{name}:0.8>.") from None
    stripped = LORA_TAG.sub("", prompt)
    if "<lora:" in stripped:
        raise ValueError(f"Unclosed LoRA tag in {prompt!r}: write <lora:name:weight>, e.g. <lora:style:0.8>.")
    # Commas the tags leave behind ("a cat, <lora:x:1>") are removed with them.
    text = re.sub(r"\s*,(\s*,)+", ",", re.sub(r"\s+", " ", stripped)).strip(" ,")
    return text, weights


def apply_lora_tags(pipe, prompt: str, loras: dict[str, str | Path]) -> str:
    """Load and weight the LoRAs a prompt's tags name; return the prompt without them.

    ``loras``: name -> a folder saved by ``save_lora`` or a ``.safetensors`` file (kohya's format, as
    ``export_kohya`` writes and the web UIs share). Each is loaded once, as an adapter of that name;
    a prompt without tags runs the plain model, as in the web UI.
    """
    text, weights = parse_lora_tags(prompt, loras)
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    for name in weights:
        if name not in loaded:
            path = Path(loras[name])
            folder, file = (path.parent, path.name) if path.suffix == ".safetensors" else (path, WEIGHT_NAME)
            if not (folder / file).is_file():
                raise FileNotFoundError(f"<lora:{name}:...>: {folder / file} does not exist.")
            with warnings.catch_warnings():  # peft warns at every adapter after the first: stacking is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # weight_name: diffusers before 0.40 (Colab has 0.39) needs it to load a folder offline
                pipe.load_lora_weights(str(folder), weight_name=file, adapter_name=name)
            loaded.add(name)
    if weights:
        pipe.enable_lora()
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    elif loaded:
        pipe.disable_lora()
    return text


def fuse_into(unet_state: dict[str, torch.Tensor], folder: str | Path, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """A UNet's weights with a LoRA saved by ``save_lora`` folded in, W + weight·(alpha/rank)·B·A, alpha and rank
    as saved with it (``lora_scale``): a whole model that draws what the LoRA taught, e.g. to merge with another."""
    layers, settings = _unet_peft_state(folder), adapter_settings(folder)
    fused = dict(unet_state)
    for key, down in layers.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            target = fused[module + ".weight"]
            # B·A for a linear layer; for a LoCon convolution (A a k x k conv to rank channels, B a 1x1
            # back) the same product over the flattened kernels, reshaped to the conv's weight.
            up = layers[module + ".lora_B.weight"].float().flatten(1)
            delta = (up @ down.float().flatten(1)).reshape(target.shape) * lora_scale(settings, module, down.shape[0])
            fused[module + ".weight"] = (target.float() + weight * delta.to(target.device)).to(target.dtype)
    return fused
