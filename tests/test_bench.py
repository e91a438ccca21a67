"""bench.py and util/benchmark.py: FLOPs counted on the meta device against real CPU tensors, the closed form and the
paper, the sampler's evaluations, and tiny runs of every mode that leave the test process as they found it."""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import bench
import model_jit
from denoiser import Denoiser
from util import benchmark
from util.misc import autocast


def tiny_denoiser(make_args, *argv, device="cpu"):
    with torch.device(device):
        return Denoiser(make_args("--attn_impl", "fp32", *argv))


def test_meta_flop_count_equals_real_forward_and_backward(make_args, perturb):
    # on real CPU tensors FlopCounterMode sees every matmul of the fp32 attention; on meta tensors the sdpa kernel
    # decomposes into counted bmm's: both must count the same training step
    model = perturb(tiny_denoiser(make_args))
    x, labels = torch.rand(3, 3, 32, 32) * 2 - 1, torch.arange(3)
    with FlopCounterMode(display=False) as counter:
        model(x, labels).backward()
    with torch.device("meta"):
        meta = Denoiser(make_args())  # sdpa
    counted = benchmark.model_flops(meta, 32, batch_size=3)
    assert counted["train"] == pytest.approx(counter.get_total_flops() / 3, rel=1e-6)
    # backward of every layer costs twice its forward, except the input gradient of the first convolution
    assert 2.9 < counted["train"] / counted["forward"] < 3.0


@pytest.mark.parametrize("name,paper_gmacs", [("JiT-B/16", 25), ("JiT-L/16", 88), ("JiT-H/16", 182),
                                              ("JiT-G/16", 383)])
def test_flop_count_matches_paper_gflops(make_args, name, paper_gmacs):
    # the paper's GFLOPs are multiply-accumulates of one forward pass at 256 px
    with torch.device("meta"):
        model = Denoiser(make_args("--model", name, "--img_size", "256", "--class_num", "1000"))
    x, t, y = torch.zeros(1, 3, 256, 256, device="meta"), torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        macs = benchmark.count_flops(lambda: model.net(x, t, y)) / 2
    assert macs / 1e9 == pytest.approx(paper_gmacs, rel=0.03)


def closed_form_forward_flops(depth, width, patch, bottleneck, in_context_start, in_context_len, img_size):
    """2 x the multiply-accumulates of one image through the JiT: t embedding MLP, bottleneck patch embedding, per
    block adaLN, qkv, q k^T, attention x v, projection and SwiGLU (hidden 2/3 x 4 x width), final adaLN and linear;
    from block in_context_start on, the sequence holds the in-context tokens too."""
    n, d, hidden = (img_size // patch) ** 2, width, int(4 * width * 2 / 3)
    macs = 256 * d + d * d + n * patch ** 2 * 3 * bottleneck + n * bottleneck * d + 2 * d * d + n * d * patch ** 2 * 3
    for block in range(depth):
        s = n + (in_context_len if block >= in_context_start else 0)
        macs += 6 * d * d + 3 * s * d * d + 2 * s * s * d + s * d * d + 3 * s * d * hidden
    return 2 * macs


@pytest.mark.parametrize("name,img_size,shape", [("JiT-B/16", 256, (12, 768, 16, 128, 4, 32)),
                                                 ("JiT-T/4", 32, (6, 192, 4, 32, 2, 8))])
def test_flop_count_equals_the_closed_form(make_args, name, img_size, shape):
    with torch.device("meta"):
        model = Denoiser(make_args("--model", name, "--img_size", str(img_size)))
    assert benchmark.model_flops(model, img_size)["forward"] == closed_form_forward_flops(*shape, img_size)


@pytest.mark.parametrize("method,steps,cfg,interval_min,evaluations", [
    ("heun", 10, 1.0, 0.1, 19),  # 9 Heun steps x 2 + the last step, always Euler
    ("heun", 10, 2.9, 0.1, 35),  # the null pass doubles all but the 3 evaluations at t = 0 and 0.1
    ("heun", 10, 2.9, 0.0, 38),  # an interval from 0 doubles every evaluation
    ("euler", 10, 1.0, 0.1, 10),
    ("euler", 10, 2.9, 0.1, 18),  # t = 0 and 0.1 single, 0.2 ... 0.9 doubled
    ("heun", 50, 2.9, 0.1, 187),  # the README's benchmark: 99 evaluations, 88 doubled
])
def test_network_evaluations_per_sample(make_args, method, steps, cfg, interval_min, evaluations):
    with torch.device("meta"):
        model = Denoiser(make_args("--sampling_method", method, "--num_sampling_steps", str(steps), "--cfg", str(cfg),
                                   "--interval_min", str(interval_min), "--interval_max", "1.0"))
    assert model.network_evaluations() == evaluations
    # what generate() runs, counted by FlopCounterMode, is what bench.py reports from the Denoiser's count
    flops = benchmark.model_flops(model, 32)
    assert flops["sample"] == evaluations * flops["forward"]
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    assert benchmark.count_flops(lambda: model.generate(labels)) == 2 * flops["sample"]


def process_state():
    return torch.get_num_threads(), torch.random.get_rng_state(), torch.get_default_dtype()


def assert_same_state(before):
    threads, rng, dtype = process_state()
    assert threads == before[0] and torch.equal(rng, before[1]) and dtype == before[2]


def run_bench(capsys, *argv):
    before = process_state()
    rec = bench.main([*argv, "--device", "cpu", "--precision", "fp32", "--default_malloc"])
    assert_same_state(before)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(rec, sort_keys=True))
    return printed


def test_bench_runs_end_to_end_on_a_tiny_config(capsys, make_args):
    rec = run_bench(capsys, "--model", "JiT-T/4", "--img_size", "16", "--class_num", "10", "--threads", "1",
                    "--batch_size", "2", "--gen_bsz", "2", "--train_iters", "1", "--sampling_steps", "3",
                    "--gemm_sizes", "64", "--gemm_min_time", "0.05", "--gemm_recheck", "0.05")
    assert rec["threads"] == 1 and rec["train_images_per_s"] > 0 and rec["sample_images_per_s"] > 0
    for phase in ("train_step", "sample_batch"):
        assert len(rec[f"{phase}_paired_peak_flops_per_s"]) == 2  # before and after the one timed call
        assert 0 < rec[f"{phase}_frac_of_paired_peak"] and rec[f"{phase}_peak_mem_bytes"] > 0
    assert all(r["flops_per_s"] <= r["best_call_flops_per_s"] for r in rec["gemm_results"])
    # Heun 3 steps, CFG on (0.1, 1): t = 0 alone, then t = 1/3 (x2) and 2/3 (x3) with the null pass
    assert rec["sample_evaluations_per_image"] == 1 + 2 * 4
    assert rec["sample_flops_per_image"] == pytest.approx((1 + 2 * 4) * rec["fwd_flops_per_image"])


def test_text_overhead_mode(capsys, tiny_llm_path):
    rec = run_bench(capsys, "--model", "JiT-T/4", "--img_size", "32", "--batch_size", "2", "--train_iters", "1",
                    "--text_llm", tiny_llm_path, "--text_conditioning", "pooled", "tokens", "--text_captions", "8")
    for key in ("class_step_s", "text_step_cached_s", "llm_per_step_s"):
        assert rec[key] > 0
    assert set(rec["text_step_s"]) == set(rec["embed_captions_per_s"]) == {"pooled", "tokens"}
    assert rec["text_step_cached_s"] == rec["text_step_s"]["pooled"]  # the first mode listed
    assert all(v > 0 for v in [*rec["text_step_s"].values(), *rec["embed_captions_per_s"].values()])


def test_loader_mode_measures_jpegs_and_shards(capsys):
    rec = run_bench(capsys, "--loader", "--loader_images", "12", "--loader_sizes", "32",
                    "--loader_seconds", "0.3")
    jpeg, shards = rec["loader"]["jpeg_32"], rec["loader"]["shards_32"]
    assert shards["images_per_cpu_s"] > 2 * jpeg["images_per_cpu_s"] > 0  # no decoding, no resizing
    assert 3 * 32 * 32 <= shards["disk_bytes_per_image"] < 3 * 32 * 32 + 20  # uint8 crops + the .npy header
    assert jpeg["disk_bytes_per_image"] > 10_000  # 500 x 375 photographs at quality 90


def test_activation_bytes_counted_on_fake_tensors_are_those_of_a_real_forward(make_args):
    """bench.py --memory counts what a bf16 training forward keeps for its backward, on fake tensors (no memory):
    the bytes of a real forward, which are what torch's MemTracker finds alive at its end besides the weights (and
    the 4-byte loss), exactly linear in the batch size."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    with torch.random.fork_rng(devices=[]):
        real_model = Denoiser(make_args())
        real = [benchmark.saved_for_backward_bytes(real_model, n, 32, "bf16") for n in (1, 2, 3)]
        with FakeTensorMode():
            fake_model = Denoiser(make_args())
            fake = [benchmark.saved_for_backward_bytes(fake_model, n, 32, "bf16") for n in (1, 2, 3)]
    assert fake == real
    assert real[2] - real[1] == real[1] - real[0] > 0
    real_model.net.pos_embed.requires_grad_(True)  # MemTracker hooks every parameter's gradient: none may be frozen
    for batch, expected in zip((1, 2), real):
        tracker = MemTracker()
        tracker.track_external(real_model)
        with tracker:
            # autocast's exit frees the weight casts no backward needs; attention in the fused kernel, as counted
            with autocast(torch.device("cpu"), "bf16"), model_jit.cpu_attention("fused"):
                loss = real_model(torch.zeros(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.long))
            alive = tracker.get_tracker_snapshot()[torch.device("cpu")]
        del loss
        assert alive["Total"] - alive[_MemRefType.PARAM] - alive[_MemRefType.BUFFER] == expected + 4
    # fp32 keeps float32 activations where bf16 keeps bfloat16 ones
    fp32 = [benchmark.saved_for_backward_bytes(real_model, n, 32, "fp32") for n in (1, 2)]
    assert 1.3 < (fp32[1] - fp32[0]) / (real[1] - real[0]) < 2


def test_memory_mode_adds_up_the_training_memory_of_a_model(capsys):
    """JiT-B/16 at batch 128 (in run_bench's fp32): float32 weights, gradients (4 bytes per trained parameter),
    AdamW's two moments and two EMA tracks, plus the activations, and the largest batch within --gpu_memory_gib."""
    rec = run_bench(capsys, "--memory", "--memory_models", "JiT-B/16", "--batch_size", "128", "--gpu_memory_gib", "72")
    row = rec["memory"]["JiT-B/16@256"]
    trained = 131_123_712  # the published count; pos_embed (1, 256, 768) is frozen
    assert row["parameters"] == trained + 256 * 768
    assert [row[k] for k in ("weights", "gradients", "adamw", "ema")] == [4 * row["parameters"], 4 * trained,
                                                                          8 * trained, 8 * row["parameters"]]
    assert row["state"] == row["weights"] + row["gradients"] + row["adamw"] + row["ema"]
    eager = row["eager"]
    assert [eager["activations_per_image"], eager["activations_per_batch"]] == list(
        bench.activation_bytes("JiT-B/16", 256, rec["precision"], compiled=False))
    assert eager["total"] == row["state"] + eager["activations_per_batch"] + 128 * eager["activations_per_image"]
    assert eager["activations_per_batch"] < 0.001 * row["weights"]  # fp32 saves the weights themselves: not counted

    def total(batch):
        return row["state"] + eager["activations_per_batch"] + batch * eager["activations_per_image"]

    assert total(eager["largest_batch"]) <= 72 * 2 ** 30 < total(eager["largest_batch"] + 1)
    assert "compiled" not in row  # --compile is off by default on a CPU


def test_flop_count_is_the_same_for_both_attention_impls(make_args):
    # the release's matmul + softmax runs on the meta device too (its autocast switch is skipped there)
    with torch.device("meta"):
        counts = [benchmark.model_flops(Denoiser(make_args("--attn_impl", impl)), 32) for impl in ("sdpa", "fp32")]
    assert counts[0] == counts[1] and counts[0]["train"] > 0


def test_compare_mode_interleaves_the_variants(capsys, monkeypatch):
    """Several --precision / --attn_impl values: every combination from the same initial weights, the warm-up
    steps, then one timed step of each variant per round, in the order listed."""
    calls = []
    step = bench.train_step

    def recording(model, model_without_ddp, optimizer, x, labels, precision):
        calls.append((precision, model.net.blocks[0].attn.attn_impl, model.net.blocks[0].attn.qkv.weight.sum().item()))
        return step(model, model_without_ddp, optimizer, x, labels, precision)

    monkeypatch.setattr(bench, "train_step", recording)
    before = process_state()
    rec = bench.main(["--model", "JiT-T/4", "--img_size", "16", "--class_num", "10", "--device", "cpu", "--threads",
                      "1", "--precision", "fp32", "bf16", "--attn_impl", "sdpa", "fp32", "--batch_size", "2",
                      "--train_warmup", "1", "--train_iters", "2", "--skip_sample", "--default_malloc"])
    assert_same_state(before)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(rec, sort_keys=True))
    variants = [("fp32", "sdpa"), ("fp32", "fp32"), ("bf16", "sdpa"), ("bf16", "fp32")]
    assert rec["variants"] == [f"{p}/{a}" for p, a in variants]
    assert [c[:2] for c in calls] == variants * 3  # warm-up, then two rounds
    assert len({c[2] for c in calls[:4]}) == 1  # the same initial weights
    assert rec["fp32/sdpa"]["train_step_speedup"] == 1.0
    for name in rec["variants"]:
        assert min(rec[name][key] for key in ("train_step_s", "train_step_cpu_s", "train_step_speedup")) > 0
        assert "sample_batch_s" not in rec[name]
    with pytest.raises(SystemExit, match="--precision/--attn_impl"):
        bench.main(["--loader", "--precision", "fp32", "bf16"])


def test_cpu_attention_variants_time_both_kernels(capsys, monkeypatch):
    """--cpu_attention matmul fused: the same training step with model_jit's matmul path and with torch's fused
    kernel at every length (as on a GPU); model_jit is left as it was."""
    kernels = []
    fused = model_jit.F.scaled_dot_product_attention
    matmul = model_jit.matmul_attention
    monkeypatch.setattr(model_jit.F, "scaled_dot_product_attention",
                        lambda *a, **k: kernels.append("fused") or fused(*a, **k))
    monkeypatch.setattr(model_jit, "matmul_attention", lambda *a, **k: kernels.append("matmul") or matmul(*a, **k))
    limit = model_jit.CPU_MATMUL_ATTENTION_MAX_TOKENS
    rec = bench.main(["--model", "JiT-T/4", "--img_size", "16", "--class_num", "10", "--device", "cpu", "--threads",
                      "1", "--precision", "bf16", "--cpu_attention", "matmul", "fused", "--batch_size", "2",
                      "--train_warmup", "0", "--train_iters", "1", "--skip_sample", "--default_malloc"])
    capsys.readouterr()
    assert rec["variants"] == ["bf16/sdpa/matmul", "bf16/sdpa/fused"]
    assert kernels == ["matmul"] * 6 + ["fused"] * 6  # one step of each, JiT-T/4's 6 blocks
    assert model_jit.CPU_MATMUL_ATTENTION_MAX_TOKENS == limit
