"""Tests of the Denoiser (denoiser.py): state_dict layout, training loss, sampler, CFG and EMA, against the JiT release
(github.com/LTH14/JiT)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from denoiser import Denoiser

NUM_CLASSES = 10  # the tiny args of conftest use --class_num 10; label 10 is the null label


# ---------------------------------------------------------------------------------------------- state_dict layout


def spec_b16_keys():
    """The official checkpoints' Denoiser-level state_dict keys, written out for JiT-B/16 at 256 px with 1000 classes
    (N = 256, D = 768)."""
    keys = [
        ("net.pos_embed", (1, 256, 768)),
        ("net.in_context_posemb", (1, 32, 768)),
        ("net.t_embedder.mlp.0.weight", (768, 256)),
        ("net.t_embedder.mlp.0.bias", (768,)),
        ("net.t_embedder.mlp.2.weight", (768, 768)),
        ("net.t_embedder.mlp.2.bias", (768,)),
        ("net.y_embedder.embedding_table.weight", (1001, 768)),
        ("net.x_embedder.proj1.weight", (128, 3, 16, 16)),
        ("net.x_embedder.proj2.weight", (768, 128, 1, 1)),
        ("net.x_embedder.proj2.bias", (768,)),
    ]
    for i in range(12):
        keys += [
            (f"net.blocks.{i}.norm1.weight", (768,)),
            (f"net.blocks.{i}.attn.q_norm.weight", (64,)),
            (f"net.blocks.{i}.attn.k_norm.weight", (64,)),
            (f"net.blocks.{i}.attn.qkv.weight", (2304, 768)),
            (f"net.blocks.{i}.attn.qkv.bias", (2304,)),
            (f"net.blocks.{i}.attn.proj.weight", (768, 768)),
            (f"net.blocks.{i}.attn.proj.bias", (768,)),
            (f"net.blocks.{i}.norm2.weight", (768,)),
            (f"net.blocks.{i}.mlp.w12.weight", (4096, 768)),
            (f"net.blocks.{i}.mlp.w12.bias", (4096,)),
            (f"net.blocks.{i}.mlp.w3.weight", (768, 2048)),
            (f"net.blocks.{i}.mlp.w3.bias", (768,)),
            (f"net.blocks.{i}.adaLN_modulation.1.weight", (4608, 768)),
            (f"net.blocks.{i}.adaLN_modulation.1.bias", (4608,)),
        ]
    keys += [
        ("net.final_layer.norm_final.weight", (768,)),
        ("net.final_layer.linear.weight", (768, 768)),
        ("net.final_layer.linear.bias", (768,)),
        ("net.final_layer.adaLN_modulation.1.weight", (1536, 768)),
        ("net.final_layer.adaLN_modulation.1.bias", (1536,)),
    ]
    return keys


def test_b16_state_dict_keys_and_shapes_equal_spec(make_args):
    args = make_args("--model", "JiT-B/16", "--img_size", "256", "--class_num", "1000", tiny=False)
    with torch.device("meta"):
        den = Denoiser(args)
    expected = spec_b16_keys()
    assert len(expected) == 183
    got = [(k, tuple(v.shape)) for k, v in den.state_dict().items()]
    assert len(got) == 183
    assert [k for k, _ in got] == [k for k, _ in expected]  # same names in the same (official) order
    assert got == expected
    # the parameter order (which indexes the optimizer state of a checkpoint) is the state_dict order
    assert [n for n, _ in den.named_parameters()] == [k for k, _ in expected]


def test_args_reach_the_network(make_args):
    den = Denoiser(make_args("--attn_impl", "fp32", "--proj_dropout", "0.3", "--img_size", "16"))
    assert den.net.grid_size == 4 and den.net.num_classes == NUM_CLASSES
    assert den.net.y_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1
    assert all(b.attn.attn_impl == "fp32" for b in den.net.blocks)
    assert [b.mlp.ffn_dropout.p for b in den.net.blocks] == [0.0, 0.3, 0.3, 0.0, 0.0, 0.0]  # depth 6: 6 // 4 .. 6 // 4 * 3


# ---------------------------------------------------------------------------------------------- training loss


class RecordingNet(nn.Module):
    """Stands in for the JiT network: x_hat = x0[label] + a * t * z; records every call (z, t, labels)."""

    def __init__(self, x0, a=0.3):
        super().__init__()
        self.register_buffer("x0", x0)
        self.a = a
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((z.clone(), t.clone(), y.clone()))
        return self.x0[y] + self.a * t.view(-1, 1, 1, 1) * z


def analytic_denoiser(make_args, *argv, img=8, a=0.3, seed=0):
    den = Denoiser(make_args("--img_size", str(img), *argv))
    gen = torch.Generator().manual_seed(seed)
    den.net = RecordingNet(torch.randn(NUM_CLASSES + 1, 3, img, img, generator=gen), a=a)
    return den


def test_loss_equals_weighted_x_loss_with_real_network(make_args, perturb):
    torch.manual_seed(0)
    den = Denoiser(make_args("--img_size", "16", "--t_eps", "0.05"))
    perturb(den.net, std=0.05)
    den.eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 3, 9, 10, 5])
    t = torch.tensor([0.0, 0.3, 0.94, 0.97, 0.999])  # the last two are above 1 - t_eps: denominator floored
    noise = torch.randn(5, 3, 16, 16)
    loss = den(x, labels, t=t, noise=noise)
    with torch.no_grad():
        tt = t.view(-1, 1, 1, 1)
        z = tt * x + (1 - tt) * noise
        x_hat = den.net(z, t, labels)
    assert x_hat.abs().max() > 0.05  # the network output is not trivially zero
    weight = 1.0 / torch.clamp(1 - t.double(), min=0.05) ** 2
    assert weight[3].item() == pytest.approx(400.0) and weight[1].item() == pytest.approx(1 / 0.49)
    expected = (weight * ((x.double() - x_hat.double()) ** 2).mean(dim=(1, 2, 3))).mean()
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_inputs_and_value_with_explicit_t_and_noise(make_args):
    den = analytic_denoiser(make_args, "--t_eps", "0.1").eval()
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    labels = torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0.1, 0.5, 0.9, 0.95])
    noise = torch.randn(4, 3, 8, 8)
    loss = den(x, labels, t=t, noise=noise)
    assert len(den.net.calls) == 1
    z, t_in, y_in = den.net.calls[0]
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(z, tt * x + (1 - tt) * noise, atol=1e-6, rtol=0)
    assert torch.equal(t_in, t) and torch.equal(y_in, labels)
    denom = torch.tensor([0.9, 0.5, 0.1, 0.1]).view(-1, 1, 1, 1)
    v = (x - z) / denom
    v_hat = (den.net.x0[labels] + 0.3 * tt * z - z) / denom
    assert loss.item() == pytest.approx(((v - v_hat) ** 2).mean(dim=(1, 2, 3)).mean().item(), rel=1e-5)


def test_random_draw_order_in_training(make_args):
    den = analytic_denoiser(make_args, "--label_drop_prob", "0.5", "--P_mean", "-0.8", "--P_std", "0.8",
                            "--noise_scale", "2.0")
    den.train()
    B = 16
    x = torch.rand(B, 3, 8, 8) * 2 - 1
    labels = torch.arange(B) % NUM_CLASSES
    torch.manual_seed(123)
    loss = den(x, labels)
    torch.manual_seed(123)
    u = torch.rand(B)  # (1) label drop
    t = torch.sigmoid(torch.randn(B) * 0.8 - 0.8)  # (2) time
    e = torch.randn_like(x) * 2.0  # (3) noise
    dropped = torch.where(u < 0.5, torch.full_like(labels, NUM_CLASSES), labels)
    assert 0 < (dropped == NUM_CLASSES).sum() < B  # the seed drops some labels and keeps others
    z, t_in, y_in = den.net.calls[0]
    assert torch.equal(y_in, dropped)
    torch.testing.assert_close(t_in, t, atol=0, rtol=0)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(z, tt * x + (1 - tt) * e, atol=1e-6, rtol=0)
    denom = (1 - tt).clamp_min(0.05)
    expected = ((((x - z) - (den.net.x0[dropped] + 0.3 * tt * z - z)) / denom) ** 2).mean(dim=(1, 2, 3)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_random_draw_order_in_eval_has_no_label_drop(make_args):
    den = analytic_denoiser(make_args, "--label_drop_prob", "1.0", "--noise_scale", "1.5").eval()
    x = torch.zeros(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 7, 8, 9])
    torch.manual_seed(7)
    den(x, labels)
    torch.manual_seed(7)
    t = torch.sigmoid(torch.randn(6) * 0.8 - 0.8)
    e = torch.randn_like(x) * 1.5
    z, t_in, y_in = den.net.calls[0]
    assert torch.equal(y_in, labels)
    assert torch.equal(t_in, t)
    torch.testing.assert_close(z, (1 - t.view(-1, 1, 1, 1)) * e, atol=1e-6, rtol=0)


def test_label_drop_only_in_training_and_maps_to_null(make_args):
    den = analytic_denoiser(make_args, "--label_drop_prob", "1.0")
    x = torch.zeros(4, 3, 8, 8)
    labels = torch.tensor([0, 3, 5, 9])
    den.eval()
    den(x, labels)
    assert torch.equal(den.net.calls[-1][2], labels)
    den.train()
    den(x, labels)
    assert torch.equal(den.net.calls[-1][2], torch.full((4,), NUM_CLASSES))
    den0 = analytic_denoiser(make_args, "--label_drop_prob", "0.0").train()
    den0(x, labels)
    assert torch.equal(den0.net.calls[-1][2], labels)


# ---------------------------------------------------------------------------------------------- sampler


def hand_sampler(x0, a, z, labels, steps, method, t_eps, cfg=1.0, interval=(0.0, 1.0)):
    """The release's sampler (Heun or Euler, the last step Euler, CFG on the interval) in float64; returns (final z,
    z before the last step, eval times)."""
    null = torch.full_like(labels, NUM_CLASSES)
    evals = []

    def f(z, t):
        lo, hi = interval
        w = cfg if (t < hi and (lo == 0 or t > lo)) else 1.0
        evals.append((t, w))
        d = max(1.0 - t, t_eps)
        v_c = (x0[labels] + a * t * z - z) / d
        v_u = (x0[null] + a * t * z - z) / d
        return v_u + w * (v_c - v_u)

    ts = [i / steps for i in range(steps + 1)]
    z = z.double()
    x0 = x0.double()
    for i in range(steps - 1):
        dt = ts[i + 1] - ts[i]
        v1 = f(z, ts[i])
        if method == "euler":
            z = z + dt * v1
        else:
            v2 = f(z + dt * v1, ts[i + 1])
            z = z + dt * (v1 + v2) / 2
    z_before = z
    z = z + (1.0 - ts[steps - 1]) * f(z, ts[steps - 1])
    return z, z_before, evals


@pytest.mark.parametrize("method, steps, n_calls", [("heun", 50, 99), ("euler", 50, 50), ("heun", 3, 5)])
def test_generate_matches_hand_loop_without_cfg(make_args, method, steps, n_calls):
    den = analytic_denoiser(make_args, "--sampling_method", method, "--num_sampling_steps", str(steps),
                            "--noise_scale", "2.0", "--t_eps", "0.05", "--cfg", "1.0")
    labels = torch.tensor([1, 4, 9])
    torch.manual_seed(5)
    calls_at_step = []
    out = den.generate(labels, on_step=lambda: calls_at_step.append(len(den.net.calls)))
    # on_step after every ODE step: steps - 1 Heun/Euler steps, then the final Euler step
    per_step = 2 if method == "heun" else 1
    assert calls_at_step == [per_step * (i + 1) for i in range(steps - 1)] + [n_calls]
    torch.manual_seed(5)
    z0 = 2.0 * torch.randn(3, 3, 8, 8)  # the first random draw of generate
    assert den.net.calls[0][0].shape == (3, 3, 8, 8)
    assert torch.equal(den.net.calls[0][0], z0)
    expected, z_before, evals = hand_sampler(den.net.x0, 0.3, z0, labels, steps, method, 0.05)
    assert out.shape == (3, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    # network evaluations: count, times (never t = 1), labels (never the null label when cfg == 1)
    calls = den.net.calls
    assert len(calls) == n_calls == len(evals)
    ts = [c[1] for c in calls]
    assert all(t.shape == (3,) and torch.all(t == t[0]) for t in ts)
    assert [t[0].item() for t in ts] == pytest.approx([e[0] for e in evals], abs=1e-6)
    assert max(t.max().item() for t in ts) < 1.0
    assert all(torch.equal(c[2], labels) for c in calls)
    # the last step is Euler from t_{S-1} to 1 on the z the network saw last
    z_last, t_last, _ = calls[-1]
    t_prev = (steps - 1) / steps
    assert t_last[0].item() == pytest.approx(t_prev, abs=1e-6)
    torch.testing.assert_close(z_last.double(), z_before, atol=1e-4, rtol=1e-4)
    x_hat = den.net.x0[labels] + 0.3 * t_prev * z_last
    final = z_last + (1 - t_prev) * (x_hat - z_last) / max(1 - t_prev, 0.05)
    torch.testing.assert_close(out, final, atol=1e-5, rtol=1e-5)


def test_generate_last_step_is_euler_with_t_eps_floor(make_args):
    """x_hat = x0 independent of z: with 50 steps 1 - t_49 = 0.02 < t_eps, so the last step only goes 40% of the way."""
    den = analytic_denoiser(make_args, "--sampling_method", "heun", "--num_sampling_steps", "50", "--t_eps", "0.05",
                            a=0.0)
    labels = torch.tensor([2, 6])
    torch.manual_seed(11)
    out = den.generate(labels)
    z_before = den.net.calls[-1][0]
    x0 = den.net.x0[labels]
    torch.testing.assert_close(out, z_before + 0.02 * (x0 - z_before) / 0.05, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, 0.6 * z_before + 0.4 * x0, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, x0, atol=1e-3)
    assert len(den.net.calls) == 99


@pytest.mark.parametrize("steps, interval", [(10, (0.1, 0.9)), (20, (0.1, 0.9)), (50, (0.1, 1.0)), (7, (0.0, 0.5))])
def test_generate_with_cfg_interval(make_args, steps, interval):
    den = analytic_denoiser(make_args, "--sampling_method", "heun", "--num_sampling_steps", str(steps),
                            "--cfg", "2.5", "--interval_min", str(interval[0]), "--interval_max", str(interval[1]))
    labels = torch.tensor([0, 5])
    null = torch.full_like(labels, NUM_CLASSES)
    torch.manual_seed(3)
    out = den.generate(labels)
    torch.manual_seed(3)
    z0 = torch.randn(2, 3, 8, 8)
    expected, _, evals = hand_sampler(den.net.x0, 0.3, z0, labels, steps, "heun", 0.05, cfg=2.5, interval=interval)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    calls = den.net.calls
    assert len(calls) == len(evals) == 2 * steps - 1
    # conditional rows in every evaluation, null rows exactly in the guided ones
    for (z, t, y), (t_exact, w) in zip(calls, evals):
        assert t[0].item() == pytest.approx(t_exact, abs=1e-6)
        if w != 1.0:
            assert torch.equal(y, torch.cat([labels, null])), t_exact
            assert torch.equal(z[:2], z[2:]) and torch.equal(t[:2], t[2:])
        else:
            assert torch.equal(y, labels), t_exact
    n_guided = sum(w != 1.0 for _, w in evals)
    lo, hi = interval
    assert n_guided == sum(1 for t, _ in evals if t < hi and (lo == 0 or t > lo))
    if (steps, interval) == (10, (0.1, 0.9)):
        assert n_guided == 14  # t = 0.2 .. 0.8 in the predictor and the corrector; not 0.1, not 0.9
    if (steps, interval) == (50, (0.1, 1.0)):
        assert n_guided == 43 + 44 + 1
    cond_rows = sum(int((c[2] != NUM_CLASSES).sum()) for c in calls)
    null_rows = sum(int((c[2] == NUM_CLASSES).sum()) for c in calls)
    assert cond_rows == 2 * len(evals) and null_rows == 2 * n_guided


def float32_neighbours(value):
    """The float32 values just below and just above float32(value)."""
    v = np.float32(value)
    return float(np.nextafter(v, np.float32(0))), float(np.nextafter(v, np.float32(1)))


def test_guidance_weights_at_interval_boundaries_are_decided_in_float32(make_args):
    den = analytic_denoiser(make_args, "--cfg", "3.0", "--interval_min", "0.1", "--interval_max", "0.9")
    below_01, above_01 = float32_neighbours(0.1)
    below_09, above_09 = float32_neighbours(0.9)
    points = [0.0, below_01, 0.1, 0.1 + 1e-9, above_01, 0.5, below_09, 0.9 - 1e-9, 0.9, above_09, 1.0]
    # 0.1 + 1e-9 and 0.9 - 1e-9 are float32(0.1) and float32(0.9): on the bounds, not inside
    assert den.guidance_weights(torch.tensor(points)) == [1, 1, 1, 1, 3, 3, 3, 1, 1, 1, 1]
    den0 = analytic_denoiser(make_args, "--cfg", "3.0", "--interval_min", "0.0", "--interval_max", "1.0")
    assert den0.guidance_weights(torch.tensor([0.0, 1e-9, 0.99, 1.0])) == [3, 3, 3, 1]  # min 0 includes t = 0


RELEASE_INTERVALS = [(0.1, 1.0), (0.0, 1.0), (0.1, 0.9), (0.2, 1.0), (0.0, 0.5), (0.3, 0.7), (0.25, 0.75)]


def release_evaluations(steps, interval, method):
    """Network evaluations per sample by the release's rule: its float32 torch.linspace(0, 1, steps + 1) grid,
    guided where (t < high) & ((low == 0) | (t > low)); Heun also at t', the last step Euler."""
    t = torch.linspace(0, 1, steps + 1)
    low, high = interval
    guided = ((t < high) & ((low == 0) | (t > low))).tolist()
    times = [i for i in range(steps - 1) for i in ((i, i + 1) if method == "heun" else (i,))] + [steps - 1]
    return sum(2 if guided[i] else 1 for i in times)


def test_cfg_interval_follows_the_release_at_every_step_count(make_args):
    """2-300 steps x common intervals, Heun and Euler: the guided evaluations are the release's, including the
    float32 grid points the exact rule i / steps would decide otherwise (t = 0.1 at 30, 60, 120, 240 steps)."""
    den = analytic_denoiser(make_args, "--cfg", "2.0")
    differs_from_exact = set()
    for steps in range(2, 301):
        for interval in RELEASE_INTERVALS:
            for method in ("heun", "euler"):
                expected = release_evaluations(steps, interval, method)
                den.num_sampling_steps, den.cfg_interval, den.sampling_method = steps, interval, method
                assert den.network_evaluations() == expected
                low, high = interval
                exact = [i / steps < high and (low == 0 or i / steps > low) for i in range(steps + 1)]
                times = [j for i in range(steps - 1) for j in ((i, i + 1) if method == "heun" else (i,))]
                if expected != sum(2 if exact[i] else 1 for i in times + [steps - 1]):
                    differs_from_exact.add((steps, interval))
    assert {(30, (0.1, 1.0)), (60, (0.1, 1.0)), (120, (0.1, 1.0)), (240, (0.1, 1.0))} <= differs_from_exact
    assert (50, (0.1, 1.0)) not in differs_from_exact


def test_generate_guides_at_the_float32_grid_point_above_0_1(make_args):
    """At 30 steps the grid point meant as 0.1 (float32 0.1000000089) gets the null-label pass, as in the release."""
    den = analytic_denoiser(make_args, "--cfg", "2.0", "--interval_min", "0.1", "--num_sampling_steps", "30",
                            "--sampling_method", "euler")
    den.generate(torch.tensor([1, 2]))
    guided = [len(y) == 4 for _, _, y in den.net.calls]
    assert guided[:5] == [False, False, False, True, True]
    assert den.net.calls[3][1][0].item() == pytest.approx(0.1, abs=1e-7) and sum(guided) == 27


def test_guided_velocity_is_v_u_plus_w_times_difference(make_args):
    den = analytic_denoiser(make_args, "--cfg", "2.0", "--interval_min", "0.2", "--interval_max", "1.0",
                            "--t_eps", "0.05")
    labels = torch.tensor([3, 7])
    z = torch.randn(2, 3, 8, 8)
    x0 = den.net.x0
    for t_value, w in [(0.5, 2.0), (0.2, 1.0), (0.98, 2.0)]:
        t = torch.full((2, 1, 1, 1), t_value)
        v = den.velocity(z, t, den.guidance_weights(t.flatten()[:1])[0], labels)
        d = max(1 - t_value, 0.05)
        v_c = (x0[labels] + 0.3 * t_value * z - z) / d
        v_u = (x0[NUM_CLASSES] + 0.3 * t_value * z - z) / d
        assert not torch.allclose(v_c, v_u)
        torch.testing.assert_close(v, v_u + w * (v_c - v_u), atol=1e-5, rtol=1e-5)


def test_generate_settings_per_call_equal_the_configured_ones(make_args):
    """generate(cfg=, steps=) draws what a model configured with those flags draws, bit for bit (same random draws,
    same network calls), and leaves the model's own settings as they were; so do time_grid / step_methods."""
    interval = ("--interval_min", "0.2", "--interval_max", "0.8", "--sampling_method", "heun")
    configured = analytic_denoiser(make_args, "--cfg", "2.5", "--num_sampling_steps", "6", *interval)
    default = analytic_denoiser(make_args, *interval)  # main_jit's defaults otherwise: 50 steps, cfg 1
    before = (default.cfg_scale, default.num_sampling_steps)
    assert before != (2.5, 6)
    settings = {"cfg": 2.5, "steps": 6}
    labels = torch.tensor([0, 5, 9])
    torch.manual_seed(7)
    expected = configured.generate(labels)
    torch.manual_seed(7)
    out = default.generate(labels, **settings)
    assert torch.equal(out, expected)
    assert [c[2].tolist() for c in default.net.calls] == [c[2].tolist() for c in configured.net.calls]
    assert (default.cfg_scale, default.num_sampling_steps) == before
    assert torch.equal(default.time_grid(6), configured.time_grid())
    assert default.step_methods(6) == configured.step_methods()
    rows_per_label = sum(len(c[2]) for c in configured.net.calls) // len(labels)  # a guided call has 2B rows
    assert configured.network_evaluations() == rows_per_label
    default.net.calls.clear()
    torch.manual_seed(7)
    assert not torch.equal(default.generate(labels), out)  # its own settings again
    assert default.network_evaluations() == len(default.net.calls) == 2 * before[1] - 1  # unguided Heun


def test_bad_sampling_method_raises(make_args):
    den = analytic_denoiser(make_args)
    den.sampling_method = "dpm"
    with pytest.raises(ValueError, match="'dpm'"):
        den.generate(torch.tensor([1]))


# ---------------------------------------------------------------------------------------------- EMA


@pytest.fixture
def ema_denoiser(make_args):
    torch.manual_seed(0)
    return Denoiser(make_args("--img_size", "8", "--ema_decay1", "0.9", "--ema_decay2", "0.5"))


def test_ema_defaults_and_initial_copy(make_args):
    den = Denoiser(make_args("--img_size", "8"))
    assert den.ema_decays == (0.9999, 0.9996)
    params = list(den.parameters())
    for track in den.ema_params:
        assert len(track) == len(params)
        for e, p in zip(track, params):
            assert torch.equal(e, p) and e.data_ptr() != p.data_ptr()
    with torch.no_grad():
        params[0].add_(1.0)
    assert not torch.equal(den.ema_params[0][0], params[0])


def test_ema_closed_form_both_tracks(ema_denoiser):
    den = ema_denoiser
    p0 = [p.detach().double().clone() for p in den.parameters()]
    values = [1.0, -2.0, 0.5, 3.0]
    for c in values:
        with torch.no_grad():
            for p in den.parameters():
                p.fill_(c)
        den.update_ema()
    k = len(values)
    for track, d in zip((1, 2), (0.9, 0.5)):
        const = sum((1 - d) * d ** (k - j) * c for j, c in enumerate(values, start=1))
        for e, p in zip(den.ema_params[track - 1], p0):
            torch.testing.assert_close(e.double(), d ** k * p + const, atol=1e-6, rtol=1e-6)
        # the state dict of a track holds the official keys with the EMA values
        sd = den.ema_state_dict(track)
        assert list(sd) == list(den.state_dict())
        for (name, _), e in zip(den.named_parameters(), den.ema_params[track - 1]):
            assert torch.equal(sd[name], e)
    # spot value: the first block's norm weight starts at 1 -> d^4 + const
    name = "net.blocks.0.norm1.weight"
    sd1 = den.ema_state_dict(1)
    expected1 = 0.9 ** 4 * 1.0 + 0.1 * (0.9 ** 3 * 1.0 + 0.9 ** 2 * -2.0 + 0.9 * 0.5 + 3.0)
    assert sd1[name][0].item() == pytest.approx(expected1, abs=1e-6)
    expected2 = 0.5 ** 4 + 0.5 * (0.5 ** 3 * 1.0 + 0.5 ** 2 * -2.0 + 0.5 * 0.5 + 3.0)
    assert den.ema_state_dict(2)[name][0].item() == pytest.approx(expected2, abs=1e-6)
    assert torch.equal(den.state_dict()[name], torch.full((192,), 3.0))  # the live weights are untouched


def test_ema_weights_swaps_and_restores(ema_denoiser, perturb):
    den = ema_denoiser
    perturb(den, std=0.1, seed=1)
    den.update_ema()
    perturb(den, std=0.1, seed=2)
    live = {k: v.clone() for k, v in den.state_dict().items()}
    ema1, ema2 = den.ema_state_dict(1), den.ema_state_dict(2)
    assert not torch.equal(ema1["net.blocks.0.attn.qkv.weight"], live["net.blocks.0.attn.qkv.weight"])
    assert not torch.equal(ema1["net.blocks.0.attn.qkv.weight"], ema2["net.blocks.0.attn.qkv.weight"])
    for track, ema in ((1, ema1), (2, ema2)):
        with den.ema_weights(track) as model:
            assert model is den
            for k, v in den.state_dict().items():
                assert torch.equal(v, ema[k]), k
        for k, v in den.state_dict().items():
            assert torch.equal(v, live[k]), k
    with den.ema_weights() as _:  # default: track 1
        assert torch.equal(den.state_dict()["net.final_layer.linear.weight"], ema1["net.final_layer.linear.weight"])
    with pytest.raises(RuntimeError, match="boom"):
        with den.ema_weights(2):
            raise RuntimeError("boom")
    for k, v in den.state_dict().items():
        assert torch.equal(v, live[k]), k
    # the EMA tracks themselves are not modified by the swap
    for track, ema in ((1, ema1), (2, ema2)):
        for k, v in den.ema_state_dict(track).items():
            assert torch.equal(v, ema[k])


def test_ema_follows_to_float64(ema_denoiser, perturb):
    den = ema_denoiser
    perturb(den, std=0.1)
    den.update_ema()
    before = [[t.clone() for t in track] for track in den.ema_params]
    den.to(torch.float64)
    for track, old in zip(den.ema_params, before):
        for e, o in zip(track, old):
            assert e.dtype == torch.float64 and torch.equal(e, o.double())
    assert all(p.dtype == torch.float64 for p in den.parameters())
    assert den.net.rope_cos.dtype == torch.float64
    den.update_ema()  # still aligned after the move
    assert den.ema_state_dict(1)["net.pos_embed"].dtype == torch.float64
    with den.ema_weights(2):
        assert den.net.pos_embed.dtype == torch.float64


def test_ema_load_state_dict_roundtrip(ema_denoiser, perturb):
    den = ema_denoiser
    perturb(den, std=0.1)
    den.update_ema()
    sd2 = den.ema_state_dict(2)
    den.load_ema_state_dict(1, sd2)
    for k, v in den.ema_state_dict(1).items():
        assert torch.equal(v, sd2[k])
    assert math.isclose(den.ema_decays[0], 0.9)
