"""Where the course runs: smoke mode, the GPU and its dtype, the outputs folder, Colab niceties.

Every notebook starts with ``rt = runtime.setup(smoke=SMOKE)``, which prints what it found.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DRIVE_ROOT = Path("/content/drive")


def smoke_from_env() -> bool:
    """True when SDCOURSE_SMOKE=1: tiny models, the sample data, a handful of steps."""
    return os.environ.get("SDCOURSE_SMOKE", "0").strip() == "1"


def in_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass
class Runtime:
    smoke: bool
    device: torch.device
    dtype: torch.dtype  # the half precision to compute in (fp16 on a T4, bf16 from compute capability 8.0, fp32 on CPU)
    gpu_name: str | None
    gpu_free_gib: float | None
    outputs: Path
    local: Path | None = None  # this runtime's own disk: fast, gone when the runtime ends (Colab's /content)

    def path(self, *parts: str) -> Path:
        """A path under the outputs folder (created), e.g. ``rt.path("dataset")``."""
        p = self.outputs.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


BF16_MIN_CAPABILITY = (8, 0)  # Ampere (A100, L4, RTX 30xx) and newer compute in bf16 natively


def has_native_bf16(device: torch.device) -> bool:
    """True on GPUs of compute capability 8.0 and up.

    Not ``torch.cuda.is_bf16_supported()``: it counts emulation and says True on a T4 (7.5), where
    bf16 runs emulated and slower than fp16 on its tensor cores.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def pick_dtype(device: torch.device) -> torch.dtype:
    """fp16 (with loss scaling when training) below compute capability 8.0 (the T4), bf16 from 8.0 on,
    fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def compute_dtype_for(setting: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a ``mixed_precision`` setting; an error for one this device cannot do well."""
    if setting == "auto":
        return pick_dtype(device)
    if setting == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a GPU; on a CPU use 'fp32' (or 'bf16').")
    if setting == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"mixed_precision='bf16' needs a GPU of compute capability 8.0 or newer; this one is "
                         f"{major}.{minor} (a T4 is 7.5) and would only emulate it, slowly. Use 'auto' or 'fp16'.")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def default_outputs(use_drive: bool) -> Path:
    """$SDCOURSE_OUTPUTS, else Drive's MyDrive/sdcourse when mounted, else ./outputs next to the notebooks."""
    if "SDCOURSE_OUTPUTS" in os.environ:
        return Path(os.environ["SDCOURSE_OUTPUTS"])
    if use_drive:
        return DRIVE_ROOT / "MyDrive" / "sdcourse"
    if Path.cwd().name == "notebooks":  # a clone: keep outputs at the repo root, out of notebooks/
        return Path.cwd().parent / "outputs"
    return Path.cwd() / "outputs"


def default_local(outputs: Path) -> Path:
    """$SDCOURSE_LOCAL, else Colab's own disk (/content/sdcourse) when outputs are on Drive, else the outputs folder."""
    if "SDCOURSE_LOCAL" in os.environ:
        return Path(os.environ["SDCOURSE_LOCAL"])
    if in_colab() and outputs.is_relative_to(DRIVE_ROOT):
        return Path("/content/sdcourse")
    return outputs


def setup(smoke: bool | None = None, use_drive: bool = False, outputs: str | Path | None = None) -> Runtime:
    """Detect the GPU, choose the dtype, mount Drive if asked (Colab only), create the outputs folder.

    On Colab every notebook runs in a new runtime, so ``use_drive`` (the notebooks' default) is what
    carries one notebook's outputs to the next."""
    smoke = smoke_from_env() if smoke is None else smoke
    # Recent diffusers renamed from_pretrained's torch_dtype to dtype; the course passes torch_dtype,
    # which every version from Colab's to the newest accepts, so the rename notice is only noise.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    quiet_harmless_warnings()
    if use_drive:
        if not in_colab():
            use_drive = False  # not Colab: this machine's disk outlives the notebook, nothing to mount
        else:
            from google.colab import drive  # only exists in Colab
            drive.mount(str(DRIVE_ROOT))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu_name = gpu_free = None
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info()
        gpu_free = free / 2**30
        print(f"GPU: {gpu_name}, {gpu_free:.1f} of {total / 2**30:.1f} GiB free")
    else:
        print("No GPU: running on the CPU." + ("" if smoke else
              " The real models need a GPU: in Colab, Runtime > Change runtime type > T4 GPU."))
    rt = Runtime(smoke=smoke, device=device, dtype=pick_dtype(device), gpu_name=gpu_name,
                 gpu_free_gib=gpu_free, outputs=Path(outputs) if outputs else default_outputs(use_drive))
    rt.outputs.mkdir(parents=True, exist_ok=True)
    rt.local = default_local(rt.outputs)
    rt.local.mkdir(parents=True, exist_ok=True)
    if in_colab() and not rt.outputs.is_relative_to(DRIVE_ROOT):
        print(f"Outputs stay on this runtime's disk ({rt.outputs}) and are lost when it ends: the next notebook "
              "will not find them. Tick USE_DRIVE to keep them on Google Drive.")
    print(f"Compute dtype: {str(rt.dtype).removeprefix('torch.')}; smoke mode: {'on' if smoke else 'off'}; "
          f"outputs: {rt.outputs}")
    return rt


# Log lines that appear in a notebook as red boxes and need no action: (logger, words in the message).
HARMLESS_LOG_LINES = [
    # bitsandbytes' CPU 4-bit ops look for the optional `kernels` package; the 8-bit optimizer does not use them.
    ("bitsandbytes.backends.cpu.ops", "No module named 'kernels'"),
    # Without torchvision, transformers uses the PIL image processors, which compute the same inputs.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
]


class _DropMatching(logging.Filter):
    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def quiet_harmless_warnings() -> None:
    """Drop exactly the log lines in ``HARMLESS_LOG_LINES``; every other warning of those loggers still shows."""
    for name, words in HARMLESS_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.words == words for f in logger.filters):
            logger.addFilter(_DropMatching(words))


def read_secret(name: str) -> str:
    """A secret (API key, user id, token) from Colab's secrets (the key icon in the left bar), else the
    environment variable ``name``, else typed in with hidden input; "" when none is given. Never printed."""
    if in_colab():
        from google.colab import userdata  # only exists in Colab

        try:
            return userdata.get(name)
        except Exception:  # not defined, or this notebook was not granted access: ask below
            pass
    if os.environ.get(name):
        return os.environ[name]
    import getpass

    try:
        return getpass.getpass(f"{name} (hidden; Enter to skip): ").strip()
    except (EOFError, NotImplementedError):  # no way to ask (a headless run)
        return ""


@contextmanager
def atomic_dir(target: str | Path):
    """Build a folder under a temporary name next to ``target``, then swap it in: an interruption
    leaves the old folder or the new one, never half of one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def free_memory() -> None:
    """Give cached GPU memory back after deleting a model (``del model; free_memory()``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stale_packages() -> list[str]:
    """Packages imported in this process whose installed version changed since (after a pip install)."""
    stale = []
    for dist in ("torch", "numpy", "transformers", "diffusers", "accelerate", "huggingface_hub",
                 "pillow", "PIL", "pandas", "ipywidgets", "peft", "safetensors", "tokenizers"):
        module = sys.modules.get(dist)
        loaded = getattr(module, "__version__", None)
        if loaded is None:
            continue
        try:
            installed = importlib.metadata.version("pillow" if dist == "PIL" else dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not same_release(installed, loaded):
            stale.append(f"{dist} {loaded} -> {installed}")
    return stale


def same_release(a: str, b: str) -> bool:
    """``2.13.0+cu130`` and ``2.13.0`` are the same release: pip's metadata drops the local tag that
    ``torch.__version__`` carries, and a restart for that would be for nothing."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(Version(a).public) == Version(Version(b).public)
    except InvalidVersion:
        return a == b


def restart_if_stale() -> None:
    """After ``pip install``: restart the Colab runtime only if an already-loaded package changed."""
    stale = stale_packages()
    if not stale:
        return
    print("Restarting the runtime because these loaded packages changed:", ", ".join(stale))
    print("Run the notebook again from the top after the restart.")
    if in_colab():
        os.kill(os.getpid(), 9)  # Colab restarts a killed kernel by itself
