"""The bf16 autocast code path, run on any CPU (whatever --precision auto would pick here) and compared with the
fp32 step that the other tests pin."""
import pytest
import torch

import util.misc as misc
from denoiser import Denoiser
from util.images import to_uint8

CPU = torch.device("cpu")


def fixed_batch(n=8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.arange(n) % 10
    t = torch.rand(n, generator=g)
    noise = torch.randn(n, 3, 32, 32, generator=g)
    return x, labels, t, noise


def tiny_model(make_args, perturb, *argv):
    torch.manual_seed(0)
    return perturb(Denoiser(make_args("--label_drop_prob", "0", *argv)), std=0.05)  # every output layer non-zero


def loss_and_grads(model, precision):
    model.zero_grad(set_to_none=True)
    x, labels, t, noise = fixed_batch()
    with misc.autocast(CPU, precision):
        loss = model(x, labels, t=t, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_training_step_matches_fp32(make_args, perturb):
    """One training step under --precision bf16 on the CPU (emulated where the CPU lacks bf16 units: slow, but the
    same numerics). Measured on JiT-T/4 at 32 px: loss 0.04% from fp32's, gradients 0.7% (median) and 2.4% (max)
    relative L2 error per tensor; the bounds below leave 3-10x margin."""
    model = tiny_model(make_args, perturb)
    loss32, grads32 = loss_and_grads(model, "fp32")
    loss16, grads16 = loss_and_grads(model, "bf16")
    assert loss16.dtype == torch.float32 and loss16.item() != loss32.item()  # bf16 did run
    assert loss16.item() == pytest.approx(loss32.item(), rel=5e-3)
    assert grads16.keys() == grads32.keys()
    errors = {name: relative_error(grads16[name], grads32[name]) for name in grads32}
    assert max(errors.values()) < 0.08, sorted(errors.items(), key=lambda e: -e[1])[:3]


def test_bf16_sampling_matches_fp32(make_args, perturb):
    """Sampling under bf16 autocast (Euler-Heun 4 steps, CFG 2): the uint8 images stay within a few levels of
    fp32's (measured: mean |diff| 0.55 levels, max 3)."""
    model = tiny_model(make_args, perturb, "--num_sampling_steps", "4", "--cfg", "2.0").eval()
    images = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        with misc.autocast(CPU, precision):
            images[precision] = to_uint8(model.generate(torch.arange(4))).float()
    diff = (images["bf16"] - images["fp32"]).abs()
    assert 0 < diff.mean().item() < 2 and diff.max().item() <= 12
