"""Throughput, memory and FLOP-efficiency benchmark of JiT: training step, sampling, and the training data loader.

    python bench.py --model JiT-B/16 --img_size 256 --device cpu --precision fp32 --batch_size 8 --gen_bsz 4
    python bench.py --model JiT-B/16 --device cuda --batch_size 128 --gen_bsz 256   # compiled, as main_jit.py on CUDA
    python bench.py --loader                          # loader images/s per worker, JPEG vs shards; cores per GPU
    python bench.py --memory --batch_size 128         # GPU memory of training each published model, computed
    python bench.py --model JiT-B/16 --text_llm <LLM folder>   # text-conditioning overhead of a training step
    python bench.py --model JiT-T/4 --img_size 32 --precision fp32 bf16   # variants timed in interleaved rounds

The training step is engine_jit.train_step on one fixed random batch, with main_jit's Denoiser and
util.misc.build_optimizer; sampling is Denoiser.generate. Model FLOPs are counted by torch's FlopCounterMode on the
meta device (util/benchmark), a sample's as Denoiser.network_evaluations forward passes, and compared with the
device's dense-GEMM peak in the compute dtype, re-measured around every timed iteration.
With several --precision, --attn_impl or --cpu_attention values, every combination is built from the same seed and
their training steps (and sampling calls) alternate, one call of each per round, so that a load change on a shared
machine hits them alike: seconds and CPU seconds per call, and each one's speed-up over the first listed.
A summary is printed, then one line holding a JSON object with all the figures. Helpers: util/benchmark.py.
"""
import argparse
import functools
import itertools
import json
import os
import statistics
import tempfile
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from denoiser import Denoiser
from engine_jit import train_step
import model_jit
from model_jit import ATTN_IMPLS, JiT_models
from util import benchmark
from util.args import SAMPLING_METHODS, training_args
from util.data import ImageSamples, train_transform
from util.datasets import image_folder
from util.llm import check_llm_folder
from util.misc import (autocast, build_optimizer, compile_network, configure_kernels, keep_freed_cpu_memory,
                        resolve_device)
from util.shards import ShardDataset, write_shards


def get_parser():
    p = argparse.ArgumentParser("JiT benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="JiT-B/16", choices=sorted(JiT_models))
    p.add_argument("--img_size", default=256, type=int)
    p.add_argument("--class_num", default=1000, type=int)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                   help="autocast dtype, as main_jit.py; several: compare them in interleaved rounds")
    p.add_argument("--attn_impl", nargs="+", default=["sdpa"], choices=ATTN_IMPLS,
                   help="as main_jit.py; several: compare them in interleaved rounds")
    p.add_argument("--cpu_attention", nargs="+", default=["matmul"], choices=["matmul", "fused"],
                   help="attention of a CPU training step up to model_jit.CPU_MATMUL_ATTENTION_MAX_TOKENS tokens: "
                        "matmul + softmax (the default), or torch's fused kernel at every length; several: compare "
                        "them in interleaved rounds")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the network as main_jit.py does (default: on for CUDA); warm-up pays the "
                        "compilation")
    p.add_argument("--threads", default=None, type=int, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--default_malloc", action="store_true",
                   help="CPU: keep glibc's default of unmapping freed blocks above 32 MB (main_jit.py turns it off: "
                        "util/misc.keep_freed_cpu_memory)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--batch_size", default=8, type=int, help="training batch size")
    p.add_argument("--train_iters", default=3, type=int, help="timed training steps")
    p.add_argument("--train_warmup", default=1, type=int, help="untimed training steps before them")
    p.add_argument("--lr", default=1e-4, type=float)
    p.add_argument("--gen_bsz", default=4, type=int, help="sampling batch size (labels; CFG doubles the net batch)")
    p.add_argument("--sampling_method", default="heun", choices=SAMPLING_METHODS)
    p.add_argument("--sampling_steps", default=50, type=int, help="ODE steps")
    p.add_argument("--cfg", default=2.9, type=float)
    p.add_argument("--interval_min", default=0.1, type=float)
    p.add_argument("--interval_max", default=1.0, type=float)
    p.add_argument("--sample_iters", default=1, type=int, help="timed generate() calls")
    p.add_argument("--sample_warmup", default=1, type=int, help="untimed 2-step generate() calls before them")
    p.add_argument("--gemm_sizes", default=None, help="n of the n x n GEMMs (default 1024,2048,4096 on CPU, "
                                                      "2048,4096,8192 elsewhere)")
    p.add_argument("--gemm_min_time", default=2.0, type=float, help="seconds of timed calls per size and layout")
    p.add_argument("--gemm_recheck", default=2.0, type=float,
                   help="seconds of the peak GEMM re-measured around every timed iteration (0: off)")
    p.add_argument("--gemm_max_call_s", default=20.0, type=float, help="skip a GEMM size slower than this per call")
    p.add_argument("--skip_gemm", action="store_true")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_sample", action="store_true")
    p.add_argument("--profile", default=None, choices=["train", "sample"],
                   help="profile one extra training step or generate() call (of each variant) and print the top "
                        "operators")
    p.add_argument("--profile_rows", default=30, type=int, help="operators listed by --profile")
    p.add_argument("--json_out", default=None, help="also write the JSON record to this file")
    p.add_argument("--text_llm", default=None, help="LLM folder or hub name: instead, time the -Text training step "
                                                    "on cached caption features against the class step and the LLM "
                                                    "(SmolLM2-135M: python -m util.llm --out smollm2, then "
                                                    "--text_llm smollm2)")
    p.add_argument("--text_conditioning", nargs="+", default=["pooled"], choices=["pooled", "tokens"],
                   help="with --text_llm: the text conditioning mode(s) to time, interleaved step by step with the "
                        "class-conditioned step (e.g. pooled tokens)")
    p.add_argument("--text_captions", default=512, type=int,
                   help="with --text_llm: distinct captions embedded into a fresh caption store (embedding rate)")
    p.add_argument("--memory", action="store_true",
                   help="instead, compute the GPU memory of training --memory_models at --batch_size per GPU in "
                        "--precision (see README)")
    p.add_argument("--memory_models", default="JiT-B/16,JiT-L/16,JiT-H/16,JiT-G/16,JiT-B/32,JiT-L/32,JiT-H/32,JiT-G/32",
                   help="models of --memory, each at its published size (/16 at 256 px, /32 at 512 px)")
    p.add_argument("--gpu_memory_gib", default=72.0, type=float,
                   help="GPU memory training may fill, for --memory (72: the 79.6 GiB of an 80 GB H100 less ~10%% for "
                        "the CUDA context, cuBLAS and NCCL workspaces and allocator fragmentation)")
    p.add_argument("--loader", action="store_true", help="instead, measure the training loader (see README)")
    p.add_argument("--loader_images", default=256, type=int, help="JPEGs written (and cropped into shards)")
    p.add_argument("--loader_seconds", default=5.0, type=float, help="CPU seconds of loading per measurement")
    p.add_argument("--loader_sizes", default="256,512", help="crop sizes of the loader measurement")
    p.add_argument("--gpu_tflops", default=989.0, type=float,
                   help="GPU dense bf16 TFLOP/s for the cores-per-GPU estimate (989: H100 SXM)")
    p.add_argument("--gpu_util", default=0.4, type=float, help="assumed fraction of --gpu_tflops a training step reaches")
    return p


def build(args, device, model=None, text_llm=None, text_conditioning=None):
    """Denoiser and optimizer as main_jit.py builds them, with main_jit.py's defaults for the settings not given."""
    settings = dict(model=(model or args.model) + ("-Text" if text_llm else ""), img_size=args.img_size,
                    class_num=args.class_num, attn_impl=args.attn_impl, sampling_method=args.sampling_method,
                    num_sampling_steps=args.sampling_steps, cfg=args.cfg, interval_min=args.interval_min,
                    interval_max=args.interval_max)
    if text_llm:
        settings.update(llm_model_name=text_llm, text_conditioning=text_conditioning or "pooled")
    model = Denoiser(training_args(**settings))
    model = model.to(device)
    if device.type == "meta":
        return model, None
    optimizer = build_optimizer(model, args.lr, 0.0, device)
    if args.compile:
        compile_network(model.net)
    return model, optimizer


def random_batch(args, device):
    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=gen) * 2 - 1).to(device)
    return x, torch.randint(0, args.class_num, (args.batch_size,), generator=gen).to(device)


def run_phase(args, name, call, iters, warmup, device, flops_per_call, peak, log):
    """Warm-up calls, then timed calls with the paired GEMM peak around them; memory, CPU use, FLOP/s."""
    check = None if peak is None or args.gemm_recheck <= 0 else benchmark.PairedPeak(
        device, torch.bfloat16 if args.precision == "bf16" else torch.float32, peak, args.gemm_recheck)
    with benchmark.PeakMemory(device) as mem:
        benchmark.timed_calls(warmup, call, lambda i, t, _: f"  {name} warm-up {i + 1}/{warmup}: {t:.2f} s", log)
        times, cpu, _ = benchmark.timed_calls(iters, call, lambda i, t, _: f"  {name} {i + 1}/{iters}: {t:.2f} s",
                                              log, check)
    total = sum(times)
    rec = {f"{name}_s": total / len(times), f"{name}_flops_per_s": flops_per_call * len(times) / total,
           f"{name}_cpu_util": cpu / (total * torch.get_num_threads()) if device.type == "cpu" else None,
           f"{name}_peak_mem_bytes": mem.peak, f"{name}_peak_mem_delta_bytes": mem.delta, "peak_mem_kind": mem.kind}
    if peak is not None:
        rec[f"{name}_frac_of_peak"] = rec[f"{name}_flops_per_s"] / peak["flops_per_s"]
    if check is not None:
        rec.update(check.summary(name, flops_per_call, times, log))
    log(f"{name}: {rec[f'{name}_s']:.3f} s, {rec[f'{name}_flops_per_s'] / 1e9:.1f} GFLOP/s"
        + ("" if peak is None else f" = {100 * rec[f'{name}_frac_of_peak']:.1f}% of the GEMM peak")
        + ("" if check is None else f", {100 * rec[f'{name}_frac_of_paired_peak']:.1f}% of the paired peak")
        + f"; peak memory {mem.peak / 2 ** 30:.2f} GiB ({mem.kind})")
    return rec


def model_benchmark(args, device, log):
    rec = {}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = None
    if not args.skip_gemm:
        sizes = ([int(v) for v in args.gemm_sizes.split(",")] if args.gemm_sizes else
                 [1024, 2048, 4096] if device.type == "cpu" else [2048, 4096, 8192])
        log(f"GEMM peak ({str(dtype).replace('torch.', '')}):")
        peak, results = benchmark.measure_gemm_peak(device, dtype, sizes, args.gemm_min_time, args.gemm_max_call_s,
                                                    log)
        rec.update(gemm_peak_flops_per_s=peak["flops_per_s"], gemm_peak_size=peak["size"],
                   gemm_peak_layout=peak["layout"], gemm_results=results)
    flops = benchmark.model_flops(build(args, torch.device("meta"))[0], args.img_size)
    model, optimizer = build(args, device)
    rec.update(params=sum(p.numel() for p in model.parameters() if p.requires_grad), fwd_flops_per_image=flops["forward"],
               train_flops_per_image=flops["train"], sample_flops_per_image=flops["sample"],
               sample_evaluations_per_image=model.network_evaluations())
    log(f"{args.model}: {rec['params'] / 1e6:.2f}M trainable parameters; per image: forward "
        f"{flops['forward'] / 1e9:.2f} GFLOPs, training step {flops['train'] / 1e9:.2f}, sampling "
        f"{flops['sample'] / 1e9:.1f} ({rec['sample_evaluations_per_image']} network evaluations)")
    model.train(True)
    x, labels = random_batch(args, device)
    if not args.skip_train:
        rec.update(run_phase(args, "train_step", lambda: train_step(model, model, optimizer, x, labels, args.precision),
                             args.train_iters, args.train_warmup, device, args.batch_size * flops["train"], peak, log))
        rec["train_images_per_s"] = args.batch_size / rec["train_step_s"]
    sample_labels = (torch.arange(args.gen_bsz) % args.class_num).to(device)

    def generate(steps=None):
        with autocast(device, args.precision):
            return model.generate(sample_labels, steps=steps)

    if not args.skip_sample:
        model.eval()
        warm_steps = min(2, args.sampling_steps)  # both batch shapes (B, 2B with CFG) warmed
        benchmark.timed_calls(args.sample_warmup, lambda: generate(warm_steps))
        rec.update(run_phase(args, "sample_batch", generate, args.sample_iters, 0, device,
                             args.gen_bsz * flops["sample"], peak, log))
        rec["sample_images_per_s"] = args.gen_bsz / rec["sample_batch_s"]
    if args.profile:
        model.train(args.profile == "train")
        profile_call(args, lambda: train_step(model, model, optimizer, x, labels, args.precision)
                     if args.profile == "train" else generate(), log)
    return rec


def profile_call(args, call, log):
    """The --profile_rows operators of call() with the most self CPU time (torch.profiler)."""
    from torch.profiler import profile
    with profile() as prof:
        call()
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def compare_benchmark(args, device, variants, log):
    """Seconds and CPU seconds per training step and per generate() call of every (precision, attn_impl,
    cpu_attention) variant, in interleaved rounds; each variant's speed-up over the first: the median over rounds of
    the ratio of the first one's time to its time in the same round."""
    names = [f"{precision}/{attn_impl}" + (f"/{kind}" if len(args.cpu_attention) > 1 else "")
             for precision, attn_impl, kind in variants]
    x, labels = random_batch(args, device)
    sample_labels = (torch.arange(args.gen_bsz) % args.class_num).to(device)
    train_steps, samples = {}, {}
    for name, (precision, attn_impl, kind) in zip(names, variants):
        torch.manual_seed(args.seed)  # the same initial weights for every variant
        model, optimizer = build(argparse.Namespace(**{**vars(args), "attn_impl": attn_impl}), device)

        def step(model=model, optimizer=optimizer, precision=precision, kind=kind):
            with model_jit.cpu_attention(kind):
                return train_step(model, model, optimizer, x, labels, precision)

        def generate(model=model, precision=precision, kind=kind, steps=None):
            with autocast(device, precision), model_jit.cpu_attention(kind):
                return model.generate(sample_labels, steps=steps)

        train_steps[name] = step
        samples[name] = (model, generate)
    rec = {"variants": names}
    phases = [] if args.skip_train else [("train_step", args.batch_size, args.train_iters)]
    phases += [] if args.skip_sample else [("sample_batch", args.gen_bsz, args.sample_iters)]
    for phase, batch, rounds in phases:
        training = phase == "train_step"
        calls = {}
        for name in names:
            model, generate = samples[name]
            model.train(training)
            calls[name] = train_steps[name] if training else generate
            if training:
                benchmark.timed_calls(args.train_warmup, calls[name])
            else:  # both batch shapes (B, 2B with CFG) warmed
                benchmark.timed_calls(args.sample_warmup, lambda: generate(steps=min(2, args.sampling_steps)))
        times, cpu = {name: [] for name in names}, {name: 0.0 for name in names}
        for _ in range(rounds):
            for name in names:
                seconds, cpu_seconds, _ = benchmark.timed_calls(1, calls[name])
                times[name] += seconds
                cpu[name] += cpu_seconds
        log(f"{phase} (batch {batch}), {rounds} interleaved rounds:")
        for name in names:
            ratios = [first / own for first, own in zip(times[names[0]], times[name])]
            mean = statistics.mean(times[name])
            figures = {f"{phase}_s": mean, f"{phase}_median_s": statistics.median(times[name]),
                       f"{phase}_cpu_s": cpu[name] / rounds, f"{phase}_images_per_s": batch / mean,
                       f"{phase}_speedup": statistics.median(ratios),
                       f"{phase}_speedup_range": [min(ratios), max(ratios)]}
            rec.setdefault(name, {}).update(figures)
            log(f"  {name:10s} {figures[f'{phase}_s']:8.3f} s (median {figures[f'{phase}_median_s']:.3f}, "
                f"{figures[f'{phase}_cpu_s']:.3f} CPU s), {figures[f'{phase}_images_per_s']:8.2f} img/s, x"
                f"{figures[f'{phase}_speedup']:.2f} of {names[0]} (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    if args.profile:
        for name in names:
            log(f"{name}, one {'training step' if args.profile == 'train' else 'generate() call'}:")
            samples[name][0].train(args.profile == "train")
            profile_call(args, train_steps[name] if args.profile == "train" else samples[name][1], log)
    return rec


def text_overhead(args, device, log):
    """Seconds per training step: class-conditioned, and text-conditioned in each --text_conditioning mode from the
    caption store (timed in interleaved rounds, so a load change on a shared machine hits every kind alike), the
    LLM forward that a step would add without the store, and the store's embedding rate."""
    from util.text_store import build_store  # to time the embedding of many captions

    captions = [f"手書きの数字{i % 10}の写真、サンプル{i}" for i in range(args.batch_size)]
    x, _ = random_batch(args, device)
    ids = torch.arange(args.batch_size, device=device)
    args.class_num = args.batch_size
    kinds = ["class"] + args.text_conditioning
    steps, embed_rate = {}, {}
    with tempfile.TemporaryDirectory() as store_root:
        for kind in kinds:
            text = kind != "class"
            model, optimizer = build(args, device, text_llm=args.text_llm if text else None,
                                     text_conditioning=kind if text else None)
            if text:
                caption_llm = model.net.y_embedder.caption_llm
                many = [f"{c}、{j}" for j in range(-(-args.text_captions // len(captions))) for c in captions]
                start = time.perf_counter()  # the rate includes loading the LLM's weights, as a training start does
                build_store(caption_llm, many[:args.text_captions], store_root, device, show_progress=False)
                embed_rate[kind] = args.text_captions / (time.perf_counter() - start)
                model.net.y_embedder.use_captions(captions, store_root, show_progress=False)
            steps[kind] = functools.partial(train_step, model, model, optimizer, x, ids, args.precision)
            benchmark.timed_calls(args.train_warmup, steps[kind])
        times = {kind: [] for kind in kinds}
        for _ in range(args.train_iters):
            for kind in kinds:
                times[kind] += benchmark.timed_calls(1, steps[kind])[0]
        with caption_llm.loaded(device):
            llm_s = statistics.mean(benchmark.timed_calls(args.train_iters,
                                                          lambda: caption_llm.pooled_features(captions))[0])
    seconds = {kind: statistics.mean(t) for kind, t in times.items()}
    first = kinds[1]
    rec = {"text_llm": args.text_llm, "batch_size": args.batch_size, "class_step_s": seconds["class"],
           "text_step_cached_s": seconds[first], "text_overhead": seconds[first] / seconds["class"] - 1,
           "llm_per_step_s": llm_s, "llm_in_step_overhead": llm_s / seconds["class"],
           "text_step_s": {kind: seconds[kind] for kind in kinds[1:]},
           "text_step_vs_class": {kind: seconds[kind] / seconds["class"] for kind in kinds[1:]},
           "embed_captions_per_s": embed_rate}
    modes = ", ".join(f"{kind} text step {seconds[kind]:.3f} s ({100 * (seconds[kind] / seconds['class'] - 1):+.1f}%, "
                      f"store built at {embed_rate[kind]:.0f} captions/s)" for kind in kinds[1:])
    log(f"{args.model} batch {args.batch_size}: class step {seconds['class']:.3f} s, {modes}; running "
        f"{args.text_llm} in the step would add {llm_s:.3f} s ({100 * rec['llm_in_step_overhead']:+.1f}%), twice "
        f"per sampling evaluation with CFG")
    return rec


def loader_benchmark(args, log):
    """Images per CPU-second of one loader worker on ImageNet-like JPEGs and on prepare_data.py shards, and the
    cores per GPU that JiT-B/L/H need at the assumed GPU rate."""
    rec = {"gpu_tflops": args.gpu_tflops, "gpu_util": args.gpu_util, "loader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = benchmark.photo_folder(os.path.join(tmp, "jpeg"), args.loader_images)
        samples = [(os.path.join(root, name), 0) for root, _, names in os.walk(folder) for name in sorted(names)]
        jpeg_bytes = sum(os.path.getsize(path) for path, _ in samples) / len(samples)
        log(f"{len(samples)} JPEGs 500 x 375, quality 90 ({jpeg_bytes / 1024:.0f} KiB each); one loader process "
            f"(images per CPU-second: what one dedicated worker core delivers):")
        for size in [int(v) for v in args.loader_sizes.split(",")]:
            out = os.path.join(tmp, f"shards{size}")
            write_shards(image_folder(folder), folder, out, size)
            shards = ShardDataset(out)
            shard_bytes = sum(os.path.getsize(f) for f in shards.files) / len(shards)
            for kind, dataset, disk in (("jpeg", ImageSamples(samples, train_transform(size)), jpeg_bytes),
                                        ("shards", shards, shard_bytes)):
                per_cpu_s, per_wall_s = benchmark.loader_rate(dataset, args.loader_seconds)
                rec["loader"][f"{kind}_{size}"] = {"images_per_cpu_s": per_cpu_s, "images_per_wall_s": per_wall_s,
                                                   "disk_bytes_per_image": disk}
                log(f"  {kind:6s} {size} px: {per_cpu_s:8.0f} images per CPU-second ({per_wall_s:.0f} per wall "
                    f"second), {disk / 1024:.0f} KiB per image on disk")
    log(f"cores per GPU at {args.gpu_tflops:g} TFLOP/s x {args.gpu_util:g} (an estimate; FLOPs of a training step by "
        f"FlopCounterMode):")
    rec["cores_per_gpu"] = {}
    for size, models in ((256, ("JiT-B/16", "JiT-L/16", "JiT-H/16")), (512, ("JiT-B/32", "JiT-L/32", "JiT-H/32"))):
        if f"jpeg_{size}" not in rec["loader"]:
            continue
        for name in models:
            args.img_size = size
            model = build(args, torch.device("meta"), model=name)[0]
            train_flops = benchmark.model_flops(model, size)["train"]
            images_per_s = args.gpu_tflops * 1e12 * args.gpu_util / train_flops
            cores = {kind: images_per_s / rec["loader"][f"{kind}_{size}"]["images_per_cpu_s"]
                     for kind in ("jpeg", "shards")}
            rec["cores_per_gpu"][f"{name}@{size}"] = dict(images_per_s=images_per_s, train_gflops=train_flops / 1e9,
                                                          **cores)
            log(f"  {name} @ {size}: {train_flops / 1e9:.0f} GFLOPs per image, {images_per_s:.0f} img/s per GPU: "
                f"{cores['jpeg']:.1f} cores (JPEG), {cores['shards']:.2f} cores (shards)")
    return rec


def activation_bytes(name, img_size, precision, compiled):
    """(bytes per image, bytes per batch) that a training forward of a model keeps for its backward, from batches of
    2 and 3 on fake tensors (no memory, no compute). Compiled: with the graph partitioner of torch.compile's inductor
    (backend aot_eager_decomp_partition), which recomputes cheap operations in the backward instead of keeping their
    inputs."""
    with FakeTensorMode():
        model = Denoiser(training_args(model=name, img_size=img_size))
        if compiled:
            compile_network(model.net, backend="aot_eager_decomp_partition")
        two, three = (benchmark.saved_for_backward_bytes(model, n, img_size, precision) for n in (2, 3))
    torch._dynamo.reset()  # the next model's blocks share the code object: a fresh cache, not recompiles
    return three - two, 3 * two - 2 * three


def memory_benchmark(args, log):
    """GPU memory of training each of --memory_models at --batch_size per GPU: float32 weights, gradients (DDP's
    bucket views), AdamW's two moments, the two EMA tracks, and activation_bytes, eager and (with --compile)
    compiled; the largest batch within --gpu_memory_gib."""
    gib = 2 ** 30
    kinds = ["eager", "compiled"] if args.compile else ["eager"]
    rec = {"batch_size": args.batch_size, "gpu_memory_gib": args.gpu_memory_gib, "memory": {}}
    log(f"GPU memory of training at batch {args.batch_size} per GPU, {args.precision}, GiB (the largest batch within "
        f"{args.gpu_memory_gib:g} GiB):")
    for name in args.memory_models.split(","):
        if name not in JiT_models:
            raise SystemExit(f"--memory_models: unknown model {name!r} (known: {', '.join(sorted(JiT_models))})")
        size = 16 * JiT_models[name].keywords["patch_size"]  # the published 16 x 16 patches: 256 px for /16
        with torch.device("meta"):
            model = Denoiser(training_args(model=name, img_size=size))
        every = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state = {"weights": 4 * every, "gradients": 4 * trained, "adamw": 8 * trained, "ema": 8 * every}
        row = dict(parameters=every, **state, state=sum(state.values()))
        line = (f"  {name} @ {size}: {every / 1e6:.1f}M parameters: weights {state['weights'] / gib:.2f}, "
                f"gradients {state['gradients'] / gib:.2f}, AdamW {state['adamw'] / gib:.2f}, EMA "
                f"{state['ema'] / gib:.2f}")
        for kind in kinds:
            per_image, per_batch = activation_bytes(name, size, args.precision, kind == "compiled")
            activations = per_batch + args.batch_size * per_image
            largest = int((args.gpu_memory_gib * gib - row["state"] - per_batch) // per_image)
            row[kind] = dict(activations_per_image=per_image, activations_per_batch=per_batch,
                             activations=activations, total=row["state"] + activations, largest_batch=largest)
            line += (f"; {kind}: activations {per_image / 2 ** 20:.0f} MiB per image + {per_batch / gib:.2f} = "
                     f"{activations / gib:.1f}, total {(row['state'] + activations) / gib:.1f}, largest batch "
                     f"{largest}")
        rec["memory"][f"{name}@{size}"] = row
        log(line)
    return rec


def parse_args(argv=None):
    """The flags, with args.variants: every (precision, attn_impl, cpu_attention) combination given. With one, the
    three flags hold its values instead of lists."""
    args = get_parser().parse_args(argv)
    args.variants = list(itertools.product(args.precision, args.attn_impl, args.cpu_attention))
    if len(args.variants) > 1 and (args.loader or args.text_llm or args.memory):
        raise SystemExit("bench.py: several --precision/--attn_impl/--cpu_attention values compare the model "
                         "benchmark only, not --loader, --text_llm or --memory")
    if len(args.variants) == 1:
        args.precision, args.attn_impl, args.cpu_attention = args.variants[0]
    return args


def main(argv=None):
    """Runs a benchmark; leaves torch's thread count and RNG as it found them (main_jit's allocator setting stays
    applied on CPU unless --default_malloc: glibc has no way back to its dynamic defaults)."""
    args = parse_args(argv)
    variants = args.variants
    compare = len(variants) > 1
    if args.text_llm:
        check_llm_folder(args.text_llm, flag="--text_llm")  # one line before any model is built
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            if args.threads:
                torch.set_num_threads(args.threads)
            torch.manual_seed(args.seed)
            device = resolve_device(args.device)
            configure_kernels(args, device)  # --compile's default, as main_jit.py
            if not args.default_malloc:
                keep_freed_cpu_memory(device)  # as main_jit.py does
            rec = dict(model=args.model, img_size=args.img_size, device=device.type,
                       device_name=benchmark.device_name(device), precision=args.precision, compile=args.compile,
                       threads=torch.get_num_threads(), torch=torch.__version__,
                       train_batch_size=args.batch_size, sample_batch_size=args.gen_bsz)
            log(f"JiT benchmark: {args.model} @ {args.img_size} px, {rec['device_name']}, "
                f"{' '.join(args.precision) if compare else args.precision}")
            if compare:
                rec.update(compare_benchmark(args, device, variants, log))
            else:
                rec.update(attn_impl=args.attn_impl, cpu_attention=args.cpu_attention)
                with model_jit.cpu_attention(args.cpu_attention):
                    if args.memory:
                        rec.update(memory_benchmark(args, log))
                    elif args.loader:
                        rec.update(loader_benchmark(args, log))
                    elif args.text_llm:
                        rec.update(text_overhead(args, device, log))
                    else:
                        rec.update(model_benchmark(args, device, log))
        finally:
            torch.set_num_threads(threads)
    line = json.dumps(rec, sort_keys=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return rec


if __name__ == "__main__":
    main()
