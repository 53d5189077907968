"""Captions for a dataset: BLIP through transformers, or tag-style captions from booru tags.

    with Captioner.load(models.resolve("blip-base", smoke), rt.device, rt.dtype) as captioner:
        table = caption_dataset(captioner, dataset_dir, CaptionConfig(prefix="sks"))

Leaving the ``with`` block (or ``captioner.close()``) frees the model's memory for the next notebook.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import read_metadata, write_metadata

# Booru tags about the file or the site, not about what is in the picture.
META_TAGS = frozenset("""
    highres absurdres incredibly_absurdres lowres huge_filesize commentary commentary_request translated
    translation_request check_translation partial_commentary english_commentary chinese_commentary
    japanese_commentary korean_commentary symbol-only_commentary bad_id bad_pixiv_id bad_twitter_id bad_link
    md5_mismatch tagme artist_request character_request copyright_request source_request duplicate
    jpeg_artifacts official_art scan third-party_edit resized upscaled revision
""".split())


def tags_to_caption(tags: str, drop: frozenset[str] = META_TAGS, max_tags: int | None = None) -> str:
    """``"1girl maid_outfit highres"`` -> ``"1girl, maid outfit"``: meta tags dropped, underscores to spaces.

    Short tags keep their underscores: they are emoticons (``^_^``), not words.
    """
    kept = [t for t in tags.split() if t not in drop and not t.endswith("_request")]
    return ", ".join(t if len(t) <= 3 else t.replace("_", " ") for t in kept[:max_tags])


@dataclass
class CaptionConfig:
    batch_size: int = 16
    num_beams: int = 3        # beam search: the most likely caption, a little bland
    sampling: bool = False    # nucleus sampling instead: more varied wording, sometimes wrong
    top_p: float = 0.9        # nucleus size when sampling
    min_length: int = 5       # in tokens, counting BLIP's start token
    max_length: int = 30
    prefix: str = ""          # e.g. a trigger word: "sks"
    suffix: str = ""          # e.g. a style phrase: "anime style"
    overwrite: bool = False   # False: keep captions the dataset already has, caption only the empty ones
    column: str = "text"      # where captions go in metadata.csv ("text" is what training reads)
    seed: int = 0             # for sampling


class Captioner:
    """A BLIP captioning model and its processor on one device."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype

    @classmethod
    def load(cls, model_id: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "Captioner":
        """Load BLIP from a hub id or a local folder, in ``dtype`` on ``device``; prints which weights file.

        ``model.safetensors`` when the repository has one (``blip-large`` does). ``blip-base`` has only
        ``pytorch_model.bin`` on the hub: that file is a pickle, so it is read with
        ``torch.load(weights_only=True)``, which accepts tensors only and refuses anything that would run
        code. (``use_safetensors=True`` would instead load an unreviewed conversion pull request from the
        hub, or wait for a conversion to run, or fail.) Half precision only on a GPU: fp16 matrix
        products on a CPU are slow or unsupported.
        """
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from .models import explain_load_error

        device = torch.device(device)
        dtype = dtype if device.type == "cuda" else torch.float32
        try:
            processor = BlipProcessor.from_pretrained(model_id)
            # Safetensors when present, else the .bin through weights_only loading (transformers' order).
            # Load in fp32, then cast: the dtype argument is torch_dtype= in older transformers 4, dtype= since.
            model = BlipForConditionalGeneration.from_pretrained(model_id, weights_only=True)
        except (OSError, ValueError) as e:
            raise explain_load_error(model_id, e) from e
        except pickle.UnpicklingError as e:  # what weights_only loading raises for a pickle that is more than tensors
            raise explain_load_error(model_id, ValueError(
                f"its pytorch_model.bin holds more than tensors and was refused (weights_only=True): {e}")) from e
        if has_safetensors(model_id):
            print(f"BLIP weights: {model_id} model.safetensors")
        else:
            print(f"BLIP weights: {model_id} has no safetensors file; read pytorch_model.bin with "
                  "torch.load(weights_only=True), which loads tensors only and runs no code")
        return cls(model.to(device=device, dtype=dtype).eval(), processor, device, dtype)

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], config: CaptionConfig = CaptionConfig()) -> list[str]:
        """Captions for a batch of images (prefix and suffix not applied)."""
        inputs = self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        if config.sampling:
            torch.manual_seed(config.seed)  # generate() draws from the global generator
            search = dict(do_sample=True, top_p=config.top_p, num_beams=1)
        else:
            search = dict(do_sample=False, num_beams=config.num_beams)
        ids = self.model.generate(pixel_values=pixel_values, min_length=config.min_length,
                                  max_length=config.max_length, **search)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def close(self) -> None:
        """Free the model's memory (the next notebook needs the GPU)."""
        from .runtime import free_memory

        self.model = self.processor = None
        free_memory()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def has_safetensors(model_id: str) -> bool:
    """Whether a local folder, or a hub repository just loaded into the cache, has ``model.safetensors``."""
    from huggingface_hub import try_to_load_from_cache

    folder = Path(model_id)
    if folder.is_dir():
        return any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
    return any(isinstance(try_to_load_from_cache(model_id, name), str)
               for name in ("model.safetensors", "model.safetensors.index.json"))


def with_affixes(caption: str, config: CaptionConfig) -> str:
    return ", ".join(part for part in (config.prefix.strip(), caption, config.suffix.strip()) if part)


def caption_dataset(captioner: Captioner, dataset_dir: str | Path, config: CaptionConfig = CaptionConfig(),
                    save_every: int = 512):
    """Caption a dataset folder's images into ``metadata.csv`` column ``config.column``; returns the table.

    Without ``overwrite`` only empty captions are filled, so an interrupted run resumes where it
    stopped (progress is saved every ``save_every`` images). Sidecar .txt files are kept in step.
    """
    dataset_dir = Path(dataset_dir)
    table, todo = _rows_to_caption(dataset_dir, config)
    if todo.empty:
        return table
    began = time.perf_counter()
    progress = tqdm(total=len(todo), desc="Captioning", unit="img")  # shows images per second
    done_since_save = 0
    for start in range(0, len(todo), config.batch_size):
        rows = todo[start:start + config.batch_size]
        images = []
        for name in table.loc[rows, "file_name"]:
            with Image.open(dataset_dir / name) as img:
                images.append(img.convert("RGB"))
        for row, caption in zip(rows, captioner.caption(images, config)):
            table.at[row, config.column] = with_affixes(caption, config)
        progress.update(len(rows))
        done_since_save += len(rows)
        if done_since_save >= save_every:
            write_metadata(dataset_dir, table)
            done_since_save = 0
    progress.close()
    write_metadata(dataset_dir, table)
    seconds = time.perf_counter() - began
    print(f"Captioned {len(todo)} images in {seconds:.1f} s: {len(todo) / max(seconds, 1e-9):.1f} images/s on {captioner.device}")
    return table


def caption_from_tags(dataset_dir: str | Path, config: CaptionConfig = CaptionConfig()):
    """Tag-style captions (``tags_to_caption``) from the ``tags`` column, with the same rules as BLIP's."""
    table, todo = _rows_to_caption(Path(dataset_dir), config)
    tagged = todo[table.loc[todo, "tags"].str.strip() != ""] if "tags" in table.columns else todo[:0]
    table.loc[tagged, config.column] = [with_affixes(tags_to_caption(tags), config) for tags in table.loc[tagged, "tags"]]
    print(f"{len(tagged)} tag captions written; {len(todo) - len(tagged)} images have no tags")
    write_metadata(dataset_dir, table)
    return table


def _rows_to_caption(dataset_dir: Path, config: CaptionConfig):
    """The metadata table and the index of the rows to caption: all with ``overwrite``, else the empty ones."""
    table = read_metadata(dataset_dir)
    if config.column not in table.columns:
        table[config.column] = ""
    todo = table.index if config.overwrite else table.index[table[config.column].str.strip() == ""]
    print(f"Captioning {len(todo)} of {len(table)} images"
          + ("" if config.overwrite else f" (keeping the {len(table) - len(todo)} that have a caption)"))
    return table, todo


# --- Captions that fit the text encoder ---------------------------------------------------------

@dataclass
class CaptionFit:
    """How many captions the tokenizer cuts: CLIP reads ``limit`` tokens (77, markers included), no more."""
    total: int
    limit: int
    too_long: list[tuple[str, int, str]]  # (caption, its token count, the words past the cut)

    def __str__(self) -> str:
        if not self.too_long:
            return f"All {self.total} captions fit the text encoder's {self.limit} tokens."
        caption, n, lost = max(self.too_long, key=lambda row: row[1])
        return (f"{len(self.too_long)} of {self.total} captions are longer than the text encoder's {self.limit} tokens "
                f"and are cut in training: the longest has {n} tokens and loses {lost!r}. "
                "Shorten them (fewer tags, most important first) or accept that the end is never seen.")


def caption_fit(tokenizer, captions: list[str]) -> CaptionFit:
    """Count each caption's tokens with the model's own tokenizer (start and end markers included)."""
    limit = tokenizer.model_max_length
    too_long = []
    for caption in captions:
        ids = tokenizer(caption, truncation=False, verbose=False).input_ids  # verbose: no warning per long caption
        if len(ids) > limit:  # the text encoder keeps limit - 1 tokens and the end marker
            too_long.append((caption, len(ids), tokenizer.decode(ids[limit - 1:-1]).strip()))
    return CaptionFit(len(captions), limit, too_long)
