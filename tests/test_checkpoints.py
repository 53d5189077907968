"""What a resumed run keeps in memory after loading a checkpoint (found by benchmarks/rehearsal.py on SD 1.5)."""

import torch

from sdcourse.checkpoints import resume, tensor_bytes
from sdcourse.optimizer import LossScaler, UNetOptimizer


def test_resume_keeps_no_second_copy_of_the_optimizer_states(tmp_path, tiny_sd_path):
    # bitsandbytes deep-copies a state dict it loads: had resume returned the loaded dict with its
    # "optimizer" entry, the run would hold every 8-bit state twice (1.6 GiB more for SD 1.5).
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    params = list(unet.parameters())
    trained = UNetOptimizer(params, "adamw8bit", 1e-3, LossScaler(False), fused=True)
    unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)).sample.pow(2).mean().backward()
    trained.step()
    saved = trained.state_dict()
    torch.save({"step": 1, "optimizer": saved, "curve": {"losses": [0.5]}, "last_ema": None},
               tmp_path / "training_state.pt")

    restored = UNetOptimizer(params, "adamw8bit", 1e-3, LossScaler(False), fused=True)
    state = resume(tmp_path, restored, None, 10, torch.device("cpu"), print)

    assert state["step"] == 1 and state["curve"] == {"losses": [0.5]}
    assert tensor_bytes(state) == 0  # nothing of the optimizer's left in what the run keeps
    loaded = restored.state_dict()["optimizers"]
    assert tensor_bytes(loaded) == tensor_bytes(saved["optimizers"]) > 0
    for mine, theirs in zip(loaded, saved["optimizers"]):
        for index, values in theirs["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(mine["state"][index][key], value), key


def test_the_fused_optimizer_and_its_states_are_freed_after_training(tiny_sd_path):
    # Its hooks live on the parameters, out of the garbage collector's sight: a hook holding the optimizer
    # kept it, every parameter and every state alive after train() returned (3.5 GB for SD 1.5).
    import gc
    import weakref

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    optimizer = UNetOptimizer(list(unet.parameters()), "adamw8bit", 1e-3, LossScaler(False), fused=True)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    optimizer.backward(unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)).sample.pow(2).mean())
    optimizer.step()
    assert not torch.equal(before["conv_in.weight"], unet.conv_in.weight)  # the hooks did step
    gone_optimizer, gone_weight = weakref.ref(optimizer), weakref.ref(unet.conv_in.weight)
    del optimizer, unet, before
    gc.collect()
    assert gone_optimizer() is None and gone_weight() is None
