"""The CPU's fast paths change kernels, not the computation: attention as matmul + softmax in CPU training (the fused
kernel's inputs and float32 logits for --attn_impl sdpa, up to summation order; the release's code for fp32) and --precision auto's choice from the
CPU's features (bf16 only where the CPU multiplies bf16 natively)."""
import math

import pytest
import torch
import torch.nn.functional as F

import model_jit
import util.misc as misc
from denoiser import Denoiser

CPU = torch.device("cpu")


def tiny_batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.arange(n) % 10, torch.rand(n, generator=g), \
        torch.randn(n, 3, size, size, generator=g)


@pytest.fixture
def fused_calls(monkeypatch):
    """Records the sequence length of every call of torch's fused attention kernel from model_jit."""
    calls = []
    fused = F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        calls.append(q.shape[-2])
        return fused(q, *args, **kwargs)

    monkeypatch.setattr(model_jit.F, "scaled_dot_product_attention", recording)
    return calls


def test_cpu_training_runs_short_attention_as_matmul(make_args, perturb, fused_calls, monkeypatch):
    # JiT-T/4 at 32 px: 64 image tokens, 72 with the 8 in-context tokens
    model = perturb(Denoiser(make_args("--label_drop_prob", "0")))
    x, labels, t, noise = tiny_batch()
    model(x, labels, t=t, noise=noise).backward()
    assert fused_calls == []  # training, <= 256 tokens: matmul + softmax
    with torch.no_grad():
        model(x, labels, t=t, noise=noise)
    assert fused_calls == [64, 64, 72, 72, 72, 72]  # no gradients (sampling, validation): the fused kernel
    fused_calls.clear()
    monkeypatch.setattr(model_jit, "CPU_MATMUL_ATTENTION_MAX_TOKENS", 64)
    model(x, labels, t=t, noise=noise).backward()
    assert fused_calls == [72, 72, 72, 72]  # longer sequences: the fused kernel, as on every other device
    fused_calls.clear()
    model = perturb(Denoiser(make_args("--label_drop_prob", "0", "--attn_impl", "fp32")))
    model(x, labels, t=t, noise=noise).backward()
    with torch.no_grad():
        model(x, labels, t=t, noise=noise)
    assert fused_calls == []  # fp32 is the release's matmul + softmax everywhere


def release_attention(q, k, v):
    """The release's scaled_dot_product_attention: float32 logits and softmax, probabilities @ v under autocast."""
    with torch.autocast("cpu", enabled=False):
        weights = q.float() @ k.float().transpose(-2, -1) * (1 / math.sqrt(q.size(-1)))
    return torch.softmax(weights, dim=-1) @ v


def attention_io(attn_impl, seed=0):
    """Output and gradients of one Attention (JiT-T/4 widths, 72 tokens) under bf16 autocast, with its q, k, v."""
    torch.manual_seed(seed)
    attn = model_jit.Attention(192, 3, attn_impl=attn_impl)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.mul_(3)  # sharper attention than at init: the logits' precision shows
    x = torch.randn(2, 72, 192, requires_grad=True)
    rope = model_jit.rope_rotations(*model_jit.rope_2d_tables(64, 8, 8))
    seen = {}
    handle = attn.proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("heads", args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, rope)
    handle.remove()
    out.float().square().sum().backward()
    return seen["heads"], x.grad, attn


def test_sdpa_keeps_its_numerics_on_the_cpu_matmul_path(monkeypatch):
    """--attn_impl sdpa feeds bf16 q and k to the attention (README, Models: what the attention FID table compares):
    computed as matmul + softmax in CPU training, the logits are float32 products of the bf16-rounded q and k, as
    in the fused kernels; fp32 keeps the float32 q and k of the release."""
    captured = {}
    matmul = model_jit.matmul_attention

    def capturing(q, k, v, *args):
        captured.update(q=q, k=k, v=v)
        return matmul(q, k, v, *args)

    monkeypatch.setattr(model_jit, "matmul_attention", capturing)
    heads, grad, _ = attention_io("sdpa")
    q, k, v = captured["q"], captured["k"], captured["v"]
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = release_attention(q, k, v)
    merged = expected.transpose(1, 2).reshape(heads.shape)
    assert torch.equal(heads, merged)

    heads32, grad32, _ = attention_io("fp32")
    assert captured["q"].dtype == captured["k"].dtype == torch.float32 and captured["v"].dtype == torch.bfloat16
    assert not torch.equal(heads, heads32)  # the rounding of q and k is what tells the two settings apart

    monkeypatch.setattr(model_jit, "CPU_MATMUL_ATTENTION_MAX_TOKENS", 0)
    fused_heads, fused_grad, _ = attention_io("sdpa")  # torch's fused CPU kernel, same inputs
    # two bf16 steps (2^-7 relative) apart at most: the kernels sum in another order
    assert (heads.float() - fused_heads.float()).abs().max() <= 2 ** -7 * heads.float().abs().max()
    assert (grad - fused_grad).norm() < 1e-2 * fused_grad.norm()


def test_matmul_path_equals_the_fused_kernel_in_fp32(make_args, perturb, monkeypatch):
    """In float32 the kernel switch changes nothing beyond float32 rounding: the same loss and gradients."""
    results = {}
    for limit in (model_jit.CPU_MATMUL_ATTENTION_MAX_TOKENS, 0):
        monkeypatch.setattr(model_jit, "CPU_MATMUL_ATTENTION_MAX_TOKENS", limit)
        torch.manual_seed(0)
        model = perturb(Denoiser(make_args("--label_drop_prob", "0", "--attn_dropout", "0")), std=0.05)
        x, labels, t, noise = tiny_batch()
        loss = model(x, labels, t=t, noise=noise)
        loss.backward()
        results[limit] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (loss_matmul, grads_matmul), (loss_fused, grads_fused) = results.values()
    assert loss_matmul == pytest.approx(loss_fused, rel=1e-6)
    for name, grad in grads_fused.items():
        torch.testing.assert_close(grads_matmul[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_dropout_on_the_matmul_path(make_args, perturb):
    """--attn_dropout drops attention probabilities in CPU training as the release does (and only in training)."""
    model = perturb(Denoiser(make_args("--attn_dropout", "0.5", "--proj_dropout", "0", "--label_drop_prob", "0")))
    x, labels, t, noise = tiny_batch()
    torch.manual_seed(0)
    loss_a = model(x, labels, t=t, noise=noise)
    torch.manual_seed(1)
    loss_b = model(x, labels, t=t, noise=noise)
    assert loss_a.item() != loss_b.item()  # the dropout masks differ
    model.eval()
    assert model(x, labels, t=t, noise=noise).item() == model(x, labels, t=t, noise=noise).item()


# -------------------------------------------------------------------------------------------- --precision auto
CPU_KINDS = {  # torch.cpu.get_capabilities() of each kind, the flags that matter
    "AVX2 only": {"architecture": "x86_64", "avx2": True},
    "AVX-512 without BF16 (Skylake-X to Ice Lake)": {"architecture": "x86_64", "avx2": True, "avx512_f": True},
    "AVX512_BF16 (Zen 4, Cooper Lake)": {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True},
    "AMX (Sapphire Rapids)": {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True,
                              "amx_tile": True},
    "Arm with BF16": {"architecture": "aarch64", "neon": True, "bf16": True},
    "Arm without BF16": {"architecture": "aarch64", "neon": True},
}


@pytest.mark.parametrize("kind,onednn_bf16,expected", [
    ("AVX2 only", False, "fp32"),
    ("AVX-512 without BF16 (Skylake-X to Ice Lake)", True, "fp32"),  # oneDNN runs bf16 there, emulated
    ("AVX512_BF16 (Zen 4, Cooper Lake)", True, "bf16"),
    ("AMX (Sapphire Rapids)", True, "bf16"),
    ("AMX (Sapphire Rapids)", False, "fp32"),  # a torch built without oneDNN's bf16 kernels
    ("Arm with BF16", True, "bf16"),
    ("Arm without BF16", False, "fp32"),
])
def test_auto_precision_on_each_cpu_kind(monkeypatch, kind, onednn_bf16, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: CPU_KINDS[kind])
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    assert misc.resolve_precision("auto", CPU) == expected
    assert misc.resolve_precision("fp32", CPU) == "fp32" and misc.resolve_precision("bf16", CPU) == "bf16"


def test_matmul_attention_takes_bf16_without_autocast():
    # a model cast to bf16 (no autocast) trains on a CPU too: probabilities meet v in its dtype
    q, k, v = (torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    out = model_jit.matmul_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 8, 16)
    expected = torch.softmax(q.float() @ k.float().transpose(-2, -1) / 4, dim=-1).bfloat16().float() @ v.float()
    assert torch.allclose(out.float(), expected, atol=2e-2)
