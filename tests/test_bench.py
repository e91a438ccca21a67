"""Tests of bench.py: the analytic FLOP count against torch's FlopCounterMode and the paper, and one tiny run."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from model_jit import JiT, JiT_models


def counted_forward_flops(net, batch, img_size, device):
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    t = torch.rand(batch, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, y)
    return counter.get_total_flops()


@pytest.mark.parametrize("attn_impl", ["fp32", "sdpa"])
def test_flop_count_matches_flop_counter_on_tiny_configs(attn_impl):
    # On real CPU tensors FlopCounterMode does not see inside the fused CPU attention kernel, so sdpa is checked on
    # the meta device (where it decomposes into counted bmm's) and the explicit-matmul path on the CPU.
    device = "meta" if attn_impl == "sdpa" else "cpu"
    nets = [
        JiT_models["JiT-T/4"](input_size=32, num_classes=10, attn_impl=attn_impl),
        JiT(input_size=16, patch_size=4, hidden_size=64, depth=4, num_heads=4, bottleneck_dim=16, num_classes=7,
            in_context_len=4, in_context_start=2, attn_impl=attn_impl),
        JiT(input_size=16, patch_size=4, hidden_size=64, depth=3, num_heads=2, bottleneck_dim=8, num_classes=7,
            in_context_len=0, in_context_start=0, attn_impl=attn_impl),  # no in-context tokens
    ]
    for net in nets:
        net = net.to(device)
        img = net.grid_size * net.patch_size
        expected = bench.forward_flops(bench.shape_of(net)) * 3
        got = counted_forward_flops(net, 3, img, device)
        assert got == pytest.approx(expected, rel=0.01)


def test_flop_count_matches_flop_counter_on_b16_meta():
    with torch.device("meta"):
        net = JiT_models["JiT-B/16"](input_size=256)
    shape = bench.shape_of(net, 256)
    assert shape == bench.shape_of_model("JiT-B/16", 256)
    assert (shape.depth, shape.hidden_size, shape.num_heads, shape.mlp_hidden) == (12, 768, 12, 2048)
    got = counted_forward_flops(net, 2, 256, "meta")
    assert got == pytest.approx(2 * bench.forward_flops(shape), rel=0.01)


@pytest.mark.parametrize("name,paper_gmacs", [("JiT-B/16", 25), ("JiT-L/16", 88), ("JiT-H/16", 182),
                                              ("JiT-G/16", 383)])
def test_flop_count_matches_paper_gflops(name, paper_gmacs):
    # the paper's GFLOPs are multiply-accumulates of one forward pass at 256 px
    macs = bench.forward_macs(bench.shape_of_model(name, 256))
    assert macs["total"] / 1e9 == pytest.approx(paper_gmacs, rel=0.03)
    assert macs["total"] == sum(v for k, v in macs.items() if k != "total")


def test_train_and_sampling_flop_conventions(make_args):
    from denoiser import Denoiser
    shape = bench.shape_of_model("JiT-B/16", 256)
    assert bench.train_flops(shape) == 3 * bench.forward_flops(shape) == 6 * bench.forward_macs(shape)["total"]
    with torch.device("meta"):
        heun = Denoiser(make_args("--cfg", "2.9", "--interval_min", "0.1", "--interval_max", "1.0"))
        plain = Denoiser(make_args("--cfg", "1.0"))
        euler = Denoiser(make_args("--cfg", "2.9", "--interval_min", "0.1", "--sampling_method", "euler"))
    assert bench.sampling_evaluations(plain) == 99  # Heun 50 without guidance: 99 network calls
    # Heun 50 with CFG on (0.1, 1): the calls at t = 0, 0.02 .. 0.1 (11 of them) run without the null pass
    assert bench.sampling_evaluations(heun) == 11 + 2 * (99 - 11)
    assert bench.sampling_evaluations(euler) == 6 + 2 * (50 - 6)
    assert bench.sampling_evaluations(heun, steps=2) == 1 + 2 + 2


def test_bench_runs_end_to_end_on_a_tiny_config(capsys, tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: no OpenMP spin-waiting when other processes share the cores; restored for the other tests
        rec = bench.main(["--model", "JiT-T/4", "--img_size", "16", "--class_num", "10", "--device", "cpu",
                          "--precision", "fp32", "--threads", "1", "--batch_size", "2", "--gen_bsz", "2",
                          "--train_iters", "1", "--train_warmup", "1", "--sampling_steps", "3", "--gemm_sizes", "64",
                          "--gemm_min_time", "0.05", "--gemm_recheck", "0.05", "--json_out", str(out)])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-1])
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(rec, sort_keys=True))
    for key in ["model", "device", "precision", "fwd_flops_per_image", "fwd_gmacs_per_image", "train_flops_per_image",
                "gemm_peak_flops_per_s", "train_images_per_s", "train_flops_per_s", "train_frac_of_peak",
                "train_peak_mem_bytes", "sample_images_per_s", "sample_flops_per_s", "sample_frac_of_peak",
                "sample_evals_per_image", "sample_peak_mem_bytes", "peak_mem_kind"]:
        assert printed[key] is not None, key
    assert printed["model"] == "JiT-T/4" and printed["precision"] == "fp32" and printed["threads"] == 1
    assert printed["train_images_per_s"] > 0 and printed["sample_images_per_s"] > 0
    assert printed["gemm_peak_flops_per_s"] > 0
    # Heun 3 steps, CFG on (0.1, 1): t = 0 alone, then t = 1/3 (x2) and 2/3 (x3) with the null pass
    assert printed["sample_evals_per_image"] == 1 + 2 * 4
    assert printed["sample_evals_per_image_counted"] == printed["sample_evals_per_image"]
    assert printed["train_flops_per_s"] == pytest.approx(printed["train_images_per_s"] * 3
                                                         * printed["fwd_flops_per_image"])
    assert any("train / GEMM peak" in line for line in lines)
    # the peak is the best sustained GEMM rate (not the best single call), re-measured around each timed iteration
    assert printed["gemm_peak_flops_per_s"] == max(r["flops_per_s"] for r in printed["gemm_results"])
    assert all(r["flops_per_s"] <= r["best_call_flops_per_s"] for r in printed["gemm_results"])
    for phase, flops_per_s in (("train", printed["train_flops_per_s"]), ("sample", printed["sample_flops_per_s"])):
        rates = printed[f"{phase}_paired_peak_flops_per_s"]
        assert len(rates) == 2 and min(rates) > 0  # 1 timed iteration: before and after it
        assert printed[f"{phase}_frac_of_paired_peak"] == pytest.approx(flops_per_s / (sum(rates) / 2))
    assert any("train / paired GEMM peak" in line for line in lines)


def test_text_overhead_mode(capsys, tiny_llm_path):
    rec = bench.main(["--model", "JiT-T/4", "--img_size", "32", "--device", "cpu", "--precision", "fp32",
                      "--batch_size", "2", "--train_iters", "1", "--train_warmup", "1", "--text_llm", tiny_llm_path,
                      "--text_conditioning", "pooled", "tokens", "--text_captions", "8"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(rec))
    for key in ("class_step_s", "text_step_cached_s", "llm_per_step_s"):
        assert printed[key] > 0
    assert printed["text_overhead"] == pytest.approx(printed["text_step_cached_s"] / printed["class_step_s"] - 1)
    assert printed["text_step_cached_s"] == printed["text_step_s"]["pooled"]  # the first mode listed
    for mode in ("pooled", "tokens"):
        assert printed["text_step_s"][mode] > 0 and printed["embed_captions_per_s"][mode] > 0
        assert printed["text_step_vs_class"][mode] == pytest.approx(printed["text_step_s"][mode] / printed["class_step_s"])
