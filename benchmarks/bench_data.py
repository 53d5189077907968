"""Throughput of notebook 01's cleaning and notebook 02's BLIP captioning, each beside a naive reference.

    .venv/bin/python benchmarks/bench_data.py                 # both, ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_data.py --only clean --images 200

- clean: ``data.build_dataset`` (decode once, JPEG draft decoding, dedup, copy unchanged files) on
  synthetic photo-like JPEGs of 1-6 Mpx, vs the naive loop (open, convert to RGB, resize, save as
  PNG). Images per second for both and their ratio.
- caption: BLIP with the architecture of ``Salesforce/blip-image-captioning-base`` (its published
  sizes; random weights, so nothing is downloaded), beam search with 3 beams, at batch 16 vs batch 1.
  Random weights never stop early: every caption runs to ``max_length`` tokens, so a real model,
  whose captions end after ~10-15 tokens, is faster. On a T4 this measures the figure notebook 02
  quotes as an estimate; on a CPU it only shows the batching ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def photo_like_jpegs(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = [(850, 1200), (1200, 850), (2000, 3000)][i % 3]
        noise = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        img.save(folder / f"{i:04d}.jpg", quality=90)


def bench_clean(count: int) -> None:
    from sdcourse import data, sources

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        photo_like_jpegs(src, count)
        start = time.perf_counter()
        data.build_dataset(sources.from_folder(src), Path(tmp) / "ours", data.CleanConfig(resolution=512))
        ours = count / (time.perf_counter() - start)
        naive_out = Path(tmp) / "naive"
        naive_out.mkdir()
        start = time.perf_counter()
        for path in sorted(src.iterdir()):
            img = Image.open(path).convert("RGB")
            img.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
            img.save(naive_out / f"{path.stem}.png")
        naive = count / (time.perf_counter() - start)
    print(f"clean   {count} JPEGs of 1-6 Mpx: build_dataset {ours:.1f} images/s, naive loop {naive:.1f} images/s, "
          f"ratio {ours / naive:.2f}x")


def bench_caption(count: int, max_length: int) -> None:
    import torch
    # BlipImageProcessor, not the Pil class: the benchmark also runs under Colab's transformers 4.
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from sdcourse.captioning import CaptionConfig, Captioner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    # BlipConfig's defaults are blip-image-captioning-base's sizes: ViT-B/16 at 384 px, a BERT-base decoder.
    model = BlipForConditionalGeneration(BlipConfig())
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:  # a stand-in vocabulary: the words do not change the cost
        (Path(tmp) / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
                                                        + [f"w{i}" for i in range(100)]) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp, bos_token="[DEC]")
    image_processor = BlipImageProcessor(size={"height": 384, "width": 384})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    captioner = Captioner(model.to(device=device, dtype=dtype).eval(), processor, device, dtype)
    images = [Image.new("RGB", (512, 512), (i * 7 % 255, 90, 160)) for i in range(count)]
    config = CaptionConfig(num_beams=3, max_length=max_length)
    rates = {}
    for batch in (16, 1):
        captioner.caption(images[:1], config)  # warm-up
        start = time.perf_counter()
        for i in range(0, count, batch):
            captioner.caption(images[i:i + batch], config)
        rates[batch] = count / (time.perf_counter() - start)
    print(f"caption BLIP-base architecture ({params / 1e6:.0f}M parameters) on {device} in {str(dtype)[6:]}, "
          f"3 beams, {max_length} tokens: batch 16 {rates[16]:.2f} images/s, batch 1 {rates[1]:.2f} images/s, "
          f"ratio {rates[16] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["clean", "caption"])
    parser.add_argument("--images", type=int, default=60, help="images for the cleaning benchmark")
    parser.add_argument("--captions", type=int, default=16, help="images for the captioning benchmark")
    parser.add_argument("--max-length", type=int, default=30)
    args = parser.parse_args()
    if args.only in (None, "clean"):
        bench_clean(args.images)
    if args.only in (None, "caption"):
        bench_caption(args.captions, args.max_length)


if __name__ == "__main__":
    main()
