"""Throughput, memory and FLOP-efficiency benchmark of a JiT Denoiser: training step and sampling.

    python bench.py --model JiT-B/16 --img_size 256 --batch_size 8 --gen_bsz 4 --device cpu --precision bf16
    python bench.py --model JiT-B/16 --device cuda --batch_size 128 --gen_bsz 256 --compile
    python bench.py --model JiT-T/4 --img_size 32 --class_num 10 --device cpu --train_iters 1 --sampling_steps 2

Measured, in one run, with warm-up iterations excluded from every timing:
  * the device's dense matrix-multiply peak: square GEMMs of a few sizes (--gemm_sizes) in the compute dtype
    (bf16 for --precision bf16, fp32 otherwise), in both the A @ B and the A @ B^T (nn.Linear) layouts; the best
    sustained rate (>= --gemm_min_time seconds of back-to-back calls) is the peak;
  * training: images/s of a full step exactly as engine_jit.train_one_epoch runs it (bf16 autocast forward of
    Denoiser.forward, backward, AdamW step with the no-decay groups of main_jit, both EMA tracks through
    Denoiser.update_ema), on one fixed random batch (no data loading);
  * sampling: images/s of Denoiser.generate (Heun, --sampling_steps, CFG --cfg on --interval_min..--interval_max,
    so the batched cond+null pass runs wherever the interval applies);
  * model FLOPs per image, counted analytically from the layer shapes (forward_macs): forward FLOPs = 2 x the
    multiply-accumulates of every Linear / Conv and of the attention q k^T and attn v products (elementwise work,
    norms, softmax and RoPE are not counted). A training step = 3 x forward; sampling = number of network
    evaluations x forward, where a cond+null (CFG) pass counts as 2 evaluations of the batch. Achieved model
    FLOP/s are printed as a fraction of the GEMM peak;
  * peak memory of each phase: CUDA torch.cuda.max_memory_allocated (everything allocated by PyTorch: weights,
    EMA, optimizer state, activations); CPU the process peak RSS (VmHWM, reset before the phase through
    /proc/self/clear_refs; where that is unavailable, getrusage ru_maxrss, the peak of the whole process so far)
    and its increase over the RSS at the start of the phase; MPS the driver-allocated memory at the end of the phase.
    The CPU allocator keeps memory freed by an earlier phase, so the sampling phase's figures after training are
    not its own: measure sampling memory with --skip_train. The CPU-utilisation figures (process CPU seconds /
    (wall seconds x threads)) tell whether other processes took cores from the run (then well below 1).

A readable table is printed, then one final line holding a JSON object with all the figures.
"""
import argparse
import functools
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ============================================================================================ FLOP count
@dataclass(frozen=True)
class JiTShape:
    """What the FLOP count depends on: the config of a JiT network at one image size."""
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    img_size: int
    bottleneck_dim: int
    in_context_len: int
    in_context_start: int
    mlp_hidden: int  # SwiGLU hidden width H (w12: D -> 2H, w3: H -> D)
    in_channels: int = 3
    freq_dim: int = 256  # sinusoidal features of the timestep embedder


def shape_of(net, img_size=None):
    """JiTShape of a model_jit.JiT (works on the meta device: only shapes are read)."""
    block = net.blocks[0]
    patch = net.patch_size
    return JiTShape(
        depth=len(net.blocks), hidden_size=net.pos_embed.shape[-1], num_heads=block.attn.num_heads,
        patch_size=patch, img_size=img_size if img_size is not None else net.grid_size * patch,
        bottleneck_dim=net.x_embedder.proj1.out_channels, in_context_len=net.in_context_len,
        in_context_start=net.in_context_start, mlp_hidden=block.mlp.w3.in_features,
        in_channels=net.x_embedder.proj1.in_channels, freq_dim=net.t_embedder.frequency_embedding_size)


def shape_of_model(name, img_size):
    """JiTShape of a registered config (built on the meta device: no memory, no init cost)."""
    from model_jit import JiT_models
    with torch.device("meta"):
        net = JiT_models[name](input_size=img_size)
    return shape_of(net, img_size)


def forward_macs(s: JiTShape):
    """Multiply-accumulates of one forward pass for ONE image, by component (dict) and in total ('total').

    Tokens per block: N = (img/p)^2 image tokens before in_context_start, N + L from it on (the in-context tokens
    are prepended there and dropped before the final layer). Attention: q k^T and attn v each cost T^2 * D MACs
    (all heads together). Elementwise work (norms, RoPE, modulate, softmax, SiLU, residuals) is not counted.
    """
    D, H, p, C = s.hidden_size, s.mlp_hidden, s.patch_size, s.in_channels
    n = (s.img_size // p) ** 2
    L = s.in_context_len
    macs = dict(patch_embed=n * (C * p * p * s.bottleneck_dim + s.bottleneck_dim * D),
                t_embedder=s.freq_dim * D + D * D,
                adaLN=s.depth * D * 6 * D + D * 2 * D,  # per-image condition -> shift/scale/gate of blocks + final
                qkv=0, attn_qk=0, attn_v=0, attn_proj=0, mlp=0,
                final_linear=n * D * p * p * C)
    for i in range(s.depth):
        T = n + (L if L > 0 and i >= s.in_context_start else 0)
        macs["qkv"] += T * D * 3 * D
        macs["attn_qk"] += T * T * D
        macs["attn_v"] += T * T * D
        macs["attn_proj"] += T * D * D
        macs["mlp"] += T * D * 2 * H + T * H * D
    macs["total"] = sum(macs.values())
    return macs


def forward_flops(s: JiTShape):
    """FLOPs of one forward pass for one image (2 x MACs, the FlopCounterMode convention)."""
    return 2 * forward_macs(s)["total"]


def train_flops(s: JiTShape):
    """FLOPs of one training step for one image: forward + backward = 3 x forward."""
    return 3 * forward_flops(s)


def sampling_evaluations(denoiser, steps=None, method=None):
    """Network evaluations per image of Denoiser.generate, a cond+null (CFG) pass counting as 2.

    Mirrors generate(): steps-1 Heun (or Euler) steps on the grid i/steps, then one final Euler step;
    Denoiser.cfg_weight decides at each queried time whether the null pass runs (it is skipped where the weight is 1).
    """
    steps = denoiser.num_sampling_steps if steps is None else steps
    method = denoiser.sampling_method if method is None else method

    def evals(t_value):
        return 1 if denoiser.cfg_weight(t_value) == 1.0 else 2

    grid = [i / steps for i in range(steps + 1)]
    total = 0
    for i in range(steps - 1):
        total += evals(grid[i]) + (evals(grid[i + 1]) if method == "heun" else 0)
    return total + evals(grid[steps - 1])


# ============================================================================================ conditioning
# How a benchmark batch is conditioned. Class labels for now; the --text mode (issue 7, second half) adds a
# "text" entry whose make_train / make_sample return cached caption embeddings instead of labels, and whose
# train_step / generate call the text entry points of the Denoiser. Nothing else in this file needs to change.
class ClassConditioning:
    name = "class"

    def __init__(self, args, device):
        self.class_num, self.device = args.class_num, device

    def train_inputs(self, batch_size, generator):
        return torch.randint(0, self.class_num, (batch_size,), generator=generator).to(self.device)

    def sample_inputs(self, batch_size):
        return (torch.arange(batch_size) % self.class_num).to(self.device)

    def train_loss(self, model, x, cond):
        return model(x, cond)

    def generate(self, model, cond):
        return model.generate(cond)


CONDITIONINGS = {"class": ClassConditioning}


# ============================================================================================ device helpers
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        name = match.group(1).strip() if match else name
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def _cpu_seconds():
    """User + system CPU time of this process. On a CPU, (CPU seconds) / (wall seconds x threads) of a phase well
    below 1 means other processes took cores from the benchmark, and its rates are then too low."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of one phase (see the module docstring for what is measured on each device)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        elif self.device.type == "cpu":
            self.start_rss = _status_kib("VmRSS")
            try:  # "5" resets the peak RSS (VmHWM, also what ru_maxrss reports) of this process, Linux >= 4.0
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.kind = "cpu process peak RSS (VmHWM, reset at phase start)"
                self.resettable = True
            except OSError:
                self.kind = "cpu process peak RSS (ru_maxrss since process start)"
                self.resettable = False
        else:
            self.kind = f"{self.device.type} driver allocated at phase end"
        return self

    def __exit__(self, *exc):
        self.delta = None
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "cpu":
            hwm = _status_kib("VmHWM") if self.resettable else None
            if hwm is None:  # ru_maxrss is in KiB on Linux, bytes on macOS
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
            self.peak = hwm * 1024
            if self.start_rss is not None:
                self.delta = max(0, hwm - self.start_rss) * 1024
        elif self.device.type == "mps":
            self.peak = torch.mps.driver_allocated_memory()
        else:
            self.peak = None
        return False


# ============================================================================================ GEMM peak
def gemm_rate(device, dtype, n, layout, min_time, generator=None):
    """Sustained FLOP/s of n x n x n GEMMs ("nn": A @ B, "nt": A @ B^T as nn.Linear runs) over >= min_time seconds
    of back-to-back calls after one untimed call, and the best single call (chunks of 5 calls off CPU)."""
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    fn = (lambda: torch.mm(a, b)) if layout == "nn" else (lambda: torch.mm(a, b.t()))
    flops, chunk = 2.0 * n ** 3, 1 if device.type == "cpu" else 5
    fn()
    synchronize(device)
    iters, best, start, cpu0 = 0, 0.0, time.perf_counter(), _cpu_seconds()
    while True:
        chunk_start = time.perf_counter()
        for _ in range(chunk):
            fn()
        synchronize(device)
        now = time.perf_counter()
        iters += chunk
        best = max(best, flops * chunk / (now - chunk_start))
        if now - start >= min_time:
            break
    elapsed = time.perf_counter() - start
    util = (_cpu_seconds() - cpu0) / (elapsed * torch.get_num_threads()) if device.type == "cpu" else None
    return dict(size=n, layout=layout, iters=iters, seconds=elapsed, flops_per_s=flops * iters / elapsed,
                best_call_flops_per_s=best, cpu_util=util)


def measure_gemm_peak(device, dtype, sizes, min_time=2.0, max_call_s=20.0, log=print):
    """Dense-GEMM peak (FLOP/s, 2 n^3 per n x n x n product): the best sustained rate (gemm_rate) over the sizes and
    both layouts. Sustained, like the model's rate over whole steps: the best single call is recorded but not used,
    since a short call can catch a momentarily idle machine (on the 2-core CPU of the README, 512^3 calls ranged
    0.9x-1.45x of their mean). A size whose single call is predicted (from the previous size's rate in the same
    layout) to take longer than max_call_s is skipped, so slow dtypes on slow devices stay bounded."""
    results, rate_by_layout = [], {}
    gen = torch.Generator().manual_seed(0)
    for n in sorted(sizes):
        for layout in ("nn", "nt"):
            previous = rate_by_layout.get(layout)
            if previous is not None and 2.0 * n ** 3 / previous > max_call_s:
                log(f"  gemm {n:5d} {layout}: skipped (a call would take ~{2.0 * n ** 3 / previous:.0f} s)")
                continue
            r = gemm_rate(device, dtype, n, layout, min_time, gen)
            rate_by_layout[layout] = r["flops_per_s"]
            results.append(r)
            log(f"  gemm {n:5d} {layout}: {r['flops_per_s'] / 1e9:10.2f} GFLOP/s sustained ({r['iters']} calls, "
                f"{r['seconds']:.2f} s; best call {r['best_call_flops_per_s'] / 1e9:.2f}"
                + ("" if r["cpu_util"] is None else f", cpu util {r['cpu_util']:.2f}") + ")")
    best = max(results, key=lambda r: r["flops_per_s"]) if results else None
    return best, results


class PairedPeak:
    """The peak GEMM re-measured around every timed iteration of a phase (--gemm_recheck seconds before each one
    and after the last): on a shared or clock-varying machine the GEMM rate drifts by tens of percent within
    minutes (seen here: 85-155 GFLOP/s for the same fp32 2048^3 GEMM), so each iteration is compared with the peak
    measured seconds around it, not minutes before."""

    def __init__(self, device, dtype, best, seconds):
        # own generator: the re-measurements must not move the global RNG that the timed steps draw from
        self.measure = lambda: gemm_rate(device, dtype, best["size"], best["layout"], seconds,
                                         torch.Generator().manual_seed(0))["flops_per_s"]
        self.rates = []

    def __call__(self):
        self.rates.append(self.measure())

    def summary(self, phase, flops_per_iteration, times, log):
        """Each iteration's achieved FLOP/s over the mean of the peaks measured just before and just after it;
        JSON fields <phase>_frac_of_paired_peak (the median), ..._all and the peaks."""
        fractions = [flops_per_iteration / t / ((self.rates[i] + self.rates[i + 1]) / 2) for i, t in enumerate(times)]
        log(f"  {phase}: {' '.join(f'{100 * f:.1f}%' for f in fractions)} of the peak GEMM measured around each "
            f"timed iteration ({' '.join(f'{r / 1e9:.1f}' for r in self.rates)} GFLOP/s)")
        return {f"{phase}_frac_of_paired_peak": statistics.median(fractions),
                f"{phase}_frac_of_paired_peak_all": fractions, f"{phase}_paired_peak_flops_per_s": self.rates}


# ============================================================================================ phases
def build(args, device):
    """Denoiser and AdamW as main_jit.py builds them, from main_jit's own parser (so the defaults are the same)."""
    from denoiser import Denoiser
    from main_jit import get_args_parser
    from util.misc import build_optimizer, param_groups_weight_decay

    argv = ["--model", args.model, "--img_size", str(args.img_size), "--class_num", str(args.class_num),
            "--device", device.type, "--precision", args.precision, "--attn_impl", args.attn_impl,
            "--sampling_method", args.sampling_method, "--num_sampling_steps", str(args.sampling_steps),
            "--cfg", str(args.cfg), "--interval_min", str(args.interval_min),
            "--interval_max", str(args.interval_max), "--batch_size", str(args.batch_size),
            "--gen_bsz", str(args.gen_bsz)]
    model_args = get_args_parser().parse_args(argv)
    model = Denoiser(model_args).to(device)
    if args.optimizer_impl == "auto":  # what main_jit.py does
        optimizer = build_optimizer(model, args.lr, args.weight_decay, device)
    else:
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=args.lr,
                                      betas=(0.9, 0.95), fused=args.optimizer_impl == "fused",
                                      foreach=args.optimizer_impl == "foreach")
    if args.compile:
        model.net.compile()  # in place: parameter names, the state_dict and the EMA lists are unchanged
    return model, optimizer


def autocast(device, precision):
    from util.misc import autocast as misc_autocast
    return misc_autocast(device, precision)


def train_step(model, optimizer, cond_impl, x, cond, device, precision):
    """One training step, the same sequence as engine_jit.train_one_epoch."""
    with autocast(device, precision):
        loss = cond_impl.train_loss(model, x, cond)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_ema()
    return loss


def timed_calls(count, call, device, describe=None, log=print, peak_check=None):
    """call() count times, each one synchronised and timed; describe(i, seconds, result) -> a line to log;
    peak_check() (a PairedPeak) before every call and after the last. Returns (seconds of each call, process CPU
    seconds spent inside the calls, the last result)."""
    times, cpu_seconds, result = [], 0.0, None
    for i in range(count):
        if peak_check is not None:
            peak_check()
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        result = call()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_seconds += _cpu_seconds() - cpu0
        if describe is not None:
            log(describe(i, times[-1], result))
    if count and peak_check is not None:
        peak_check()
    return times, cpu_seconds, result


def run_train(args, model, optimizer, cond_impl, device, log, peak_check=None):
    model.train(True)
    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=gen) * 2 - 1).to(device)
    cond = cond_impl.train_inputs(args.batch_size, gen)

    def step():
        return train_step(model, optimizer, cond_impl, x, cond, device, args.precision)

    with PeakMemory(device) as mem:
        timed_calls(args.train_warmup, step, device,
                    lambda i, t, _: f"  train warm-up {i + 1}/{args.train_warmup}: {t:.2f} s", log)
        times, cpu_seconds, loss = timed_calls(
            args.train_iters, step, device,
            lambda i, t, loss: f"  train step {i + 1}/{args.train_iters}: {t:.2f} s (loss {loss.item():.4f})", log,
            peak_check)
    total = sum(times)
    cpu_util = cpu_seconds / (total * torch.get_num_threads()) if device.type == "cpu" else None
    return dict(train_cpu_util=cpu_util, train_step_s=total / len(times), train_step_s_min=min(times), train_times=times,
                train_images_per_s=args.batch_size * len(times) / total, train_loss=float(loss.item()),
                train_peak_mem_bytes=mem.peak, train_peak_mem_delta_bytes=mem.delta, peak_mem_kind=mem.kind)


class _RowCounter:
    """Counts the images that go through the network (a forward pre-hook; not used with --compile)."""

    def __init__(self, net):
        self.rows = 0
        self.handle = net.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.rows += inputs[0].shape[0]

    def remove(self):
        self.handle.remove()


def run_sample(args, model, cond_impl, device, log, peak_check=None):
    model.eval()
    cond = cond_impl.sample_inputs(args.gen_bsz)

    def generate():
        with autocast(device, args.precision):
            return cond_impl.generate(model, cond)

    with PeakMemory(device) as mem:
        # warm-up: a 2-step schedule queries the network at t = 0 and t = 0.5, so with the default interval both
        # batch shapes (B, and 2B for cond+null) are compiled / allocated before the timing
        steps, model.num_sampling_steps = model.num_sampling_steps, min(2, model.num_sampling_steps)
        timed_calls(args.sample_warmup, generate, device,
                    lambda i, t, _: f"  sample warm-up {i + 1}/{args.sample_warmup} (2 steps): {t:.2f} s", log)
        model.num_sampling_steps = steps
        counter = None if args.compile else _RowCounter(model.net)
        times, cpu_seconds, images = timed_calls(
            args.sample_iters, generate, device,
            lambda i, t, _: f"  sample batch {i + 1}/{args.sample_iters}: {t:.2f} s", log, peak_check)
        if counter is not None:
            counter.remove()
    assert images.shape == (args.gen_bsz, 3, args.img_size, args.img_size)
    total = sum(times)
    cpu_util = cpu_seconds / (total * torch.get_num_threads()) if device.type == "cpu" else None
    evals = sampling_evaluations(model)
    counted = None if counter is None else counter.rows / (args.gen_bsz * len(times))
    return dict(sample_cpu_util=cpu_util, sample_batch_s=total / len(times), sample_times=times,
                sample_images_per_s=args.gen_bsz * len(times) / total,
                sample_evals_per_image=evals, sample_evals_per_image_counted=counted,
                sample_s_per_eval_batch=total / len(times) / evals,
                sample_peak_mem_bytes=mem.peak, sample_peak_mem_delta_bytes=mem.delta, peak_mem_kind=mem.kind)


# ============================================================================================ main
def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_parser():
    from model_jit import ATTN_IMPLS, JiT_models

    p = argparse.ArgumentParser("JiT benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="JiT-B/16", choices=sorted(JiT_models))
    p.add_argument("--img_size", default=256, type=int)
    p.add_argument("--class_num", default=1000, type=int)
    p.add_argument("--device", default=default_device(), help="cpu, cuda or mps (default: the best available)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype, as main_jit.py")
    p.add_argument("--attn_impl", default="sdpa", choices=ATTN_IMPLS)
    p.add_argument("--compile", action="store_true", help="torch.compile the network (warm-up pays the compile)")
    p.add_argument("--threads", default=None, type=int, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--default_malloc", action="store_true",
                   help="CPU: keep glibc's default of unmapping freed blocks above 32 MB (main_jit.py turns it off: "
                        "util/misc.keep_freed_cpu_memory)")
    p.add_argument("--seed", default=0, type=int)
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", default=8, type=int, help="training batch size")
    g.add_argument("--train_iters", default=3, type=int, help="timed training steps")
    g.add_argument("--train_warmup", default=1, type=int, help="untimed training steps before them")
    g.add_argument("--lr", default=1e-4, type=float)
    g.add_argument("--weight_decay", default=0.0, type=float)
    g.add_argument("--optimizer_impl", default="auto", choices=["auto", "forloop", "foreach", "fused"],
                   help="AdamW implementation; auto = main_jit.py's choice (fused on CUDA, CPU and MPS)")
    g = p.add_argument_group("sampling")
    g.add_argument("--gen_bsz", default=4, type=int, help="sampling batch size (labels; CFG doubles the net batch)")
    g.add_argument("--sampling_method", default="heun", choices=["euler", "heun"])
    g.add_argument("--sampling_steps", default=50, type=int, help="ODE steps (Heun 50 = 99 network evaluations)")
    g.add_argument("--cfg", default=2.9, type=float)
    g.add_argument("--interval_min", default=0.1, type=float)
    g.add_argument("--interval_max", default=1.0, type=float)
    g.add_argument("--sample_iters", default=1, type=int, help="timed generate() calls")
    g.add_argument("--sample_warmup", default=1, type=int, help="untimed 2-step generate() calls before them")
    g = p.add_argument_group("GEMM peak")
    g.add_argument("--gemm_sizes", default=None, help="comma-separated n of the n x n GEMMs "
                   "(default 1024,2048,4096 on CPU, 2048,4096,8192 elsewhere)")
    g.add_argument("--gemm_min_time", default=2.0, type=float, help="seconds of timed calls per size and layout")
    g.add_argument("--gemm_recheck", default=2.0, type=float,
                   help="seconds of the peak GEMM re-measured before every timed iteration and after the last; "
                        "each iteration's fraction of the peak uses the two around it (0: off)")
    g.add_argument("--gemm_max_call_s", default=20.0, type=float,
                   help="skip a size whose single call is predicted to take longer than this")
    g = p.add_argument_group("phases")
    g.add_argument("--skip_gemm", action="store_true")
    g.add_argument("--skip_train", action="store_true")
    g.add_argument("--skip_sample", action="store_true")
    g.add_argument("--profile", default=None, choices=["train", "sample"],
                   help="after the measurements, profile 1 extra training step or one generate() call with "
                        "torch.profiler and print the ops grouped by name")
    g.add_argument("--json_out", default=None, help="also write the JSON record to this file")
    p.add_argument("--text_llm", default=None,
                   help="hub name or folder of an LLM: instead of the measurements above, compare the training step "
                        "of <model>-Text on cached caption features with the class-conditioned step, and with the "
                        "cost of running the LLM in every step (as the first published text-to-image version did)")
    p.add_argument("--text_conditioning", nargs="+", default=["pooled"], choices=["pooled", "tokens"],
                   help="with --text_llm: the text conditioning mode(s) to time, interleaved step by step with the "
                        "class-conditioned step (e.g. pooled tokens)")
    p.add_argument("--text_captions", default=512, type=int,
                   help="with --text_llm: distinct captions embedded into a fresh caption store to measure the "
                        "embedding rate")
    return p


def text_overhead(args, device, log):
    """Seconds per training step: class-conditioned, and text-conditioned in each --text_conditioning mode from the
    caption store (timed in interleaved rounds, so a load change on a shared machine hits every kind alike), the
    LLM forward that a step would add without the store, and the store's embedding rate. Returns the JSON record."""
    import tempfile

    from denoiser import Denoiser
    from main_jit import get_args_parser
    from util.misc import build_optimizer
    from util.text_store import build_store

    captions = [f"手書きの数字{i % 10}の写真、サンプル{i}" for i in range(args.batch_size)]
    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=gen) * 2 - 1).to(device)
    ids = torch.arange(args.batch_size, device=device)
    kinds = ["class"] + [f"text_{mode}" for mode in args.text_conditioning]
    steps, embed_rate = {}, {}
    with tempfile.TemporaryDirectory() as store_root:
        for kind in kinds:
            mode = kind.replace("text_", "")
            argv = ["--model", args.model + ("-Text" if kind != "class" else ""), "--img_size", str(args.img_size),
                    "--class_num", str(args.batch_size), "--llm_model_name", args.text_llm, "--attn_impl",
                    args.attn_impl] + (["--text_conditioning", mode] if kind != "class" else [])
            model = Denoiser(get_args_parser().parse_args(argv)).to(device)
            if kind != "class":
                encoder = model.net.y_embedder.encoder
                many = [f"{c}、{j}" for j in range(-(-args.text_captions // len(captions))) for c in captions]
                start = time.perf_counter()
                build_store(encoder, many[:args.text_captions], store_root, progress=False)
                embed_rate[mode] = args.text_captions / (time.perf_counter() - start)
                model.net.y_embedder.set_captions(captions, build_store(encoder, captions, store_root, progress=False))
            optimizer = build_optimizer(model, args.lr, args.weight_decay, device)
            steps[kind] = functools.partial(train_step, model, optimizer, ClassConditioning(args, device), x, ids,
                                            device, args.precision)
            timed_calls(args.train_warmup, steps[kind], device)
        times = {kind: [] for kind in kinds}
        for _ in range(args.train_iters):
            for kind in kinds:
                times[kind] += timed_calls(1, steps[kind], device)[0]
        llm_s = statistics.mean(timed_calls(args.train_iters, lambda: encoder.pooled_features(captions), device)[0])
    seconds = {kind: statistics.mean(t) for kind, t in times.items()}
    first = kinds[1]
    rec = {"model": args.model, "text_llm": args.text_llm, "batch_size": args.batch_size,
           "class_step_s": seconds["class"], "text_step_cached_s": seconds[first],
           "text_overhead": seconds[first] / seconds["class"] - 1, "llm_per_step_s": llm_s,
           "llm_in_step_overhead": llm_s / seconds["class"],
           "text_step_s": {kind[5:]: seconds[kind] for kind in kinds[1:]},
           "text_step_vs_class": {kind[5:]: seconds[kind] / seconds["class"] for kind in kinds[1:]},
           "embed_captions_per_s": embed_rate}
    modes = ", ".join(f"{kind[5:]} text step {seconds[kind]:.3f} s ({100 * (seconds[kind] / seconds['class'] - 1):+.1f}%, "
                      f"store built at {embed_rate[kind[5:]]:.0f} captions/s)" for kind in kinds[1:])
    log(f"{args.model} batch {args.batch_size}: class step {seconds['class']:.3f} s, {modes}; running "
        f"{args.text_llm} in the step would add {llm_s:.3f} s ({100 * rec['llm_in_step_overhead']:+.1f}%), twice "
        f"per sampling evaluation with CFG")
    return rec


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def fmt_rate(flops_per_s):
    if flops_per_s is None:
        return "-"
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def main(argv=None):
    from util.misc import keep_freed_cpu_memory, resolve_device

    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(argparse.Namespace(device=args.device, distributed=False, gpu=0))
    if not args.default_malloc:
        keep_freed_cpu_memory(device)  # as main_jit.py does
    torch.manual_seed(args.seed)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    rec = dict(model=args.model, img_size=args.img_size, device=device.type, device_name=device_name(device),
               precision=args.precision, attn_impl=args.attn_impl, compile=args.compile,
               threads=torch.get_num_threads(), torch=torch.__version__, optimizer_impl=args.optimizer_impl,
               default_malloc=args.default_malloc,
               loadavg_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    if args.train_iters < 1 or args.sample_iters < 1:
        raise SystemExit("--train_iters and --sample_iters must be >= 1 (skip a phase with --skip_train/--skip_sample)")
    if device.type == "cpu" and args.precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        rec["warning"] = ("this CPU has no native bf16 matmul (no AVX-512 BF16 / AMX): bf16 GEMMs are emulated and "
                          "much slower than fp32; --precision fp32 is the fast choice here")
        log(f"WARNING: {rec['warning']}")
    log(f"JiT benchmark: {args.model} @ {args.img_size} px, {rec['device_name']}, {args.precision}"
        f"{', compiled' if args.compile else ''}, torch {torch.__version__}")

    if args.text_llm:
        rec.update(text_overhead(args, device, log))
        print(json.dumps(rec))
        return rec

    # ------------------------------------------------------------------ GEMM peak
    peak = None
    if not args.skip_gemm:
        if args.gemm_sizes:
            sizes = [int(v) for v in args.gemm_sizes.split(",")]
        else:
            sizes = [1024, 2048, 4096] if device.type == "cpu" else [2048, 4096, 8192]
        log(f"GEMM peak ({str(compute_dtype).replace('torch.', '')}):")
        best, gemm_results = measure_gemm_peak(device, compute_dtype, sizes, args.gemm_min_time, args.gemm_max_call_s,
                                               log)
        peak = best["flops_per_s"]
        rec.update(gemm_dtype=str(compute_dtype).replace("torch.", ""), gemm_peak_flops_per_s=peak,
                   gemm_peak_size=best["size"], gemm_peak_layout=best["layout"], gemm_results=gemm_results)

    def paired_peak():
        return None if peak is None or args.gemm_recheck <= 0 else PairedPeak(device, compute_dtype, best,
                                                                            args.gemm_recheck)

    # ------------------------------------------------------------------ model and FLOPs
    cond_impl = CONDITIONINGS["class"](args, device)
    model, optimizer = build(args, device)
    shape = shape_of(model.net, args.img_size)
    macs = forward_macs(shape)
    fwd = 2 * macs["total"]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec.update(params=n_params, shape=asdict(shape), fwd_gmacs_per_image=macs["total"] / 1e9,
               fwd_flops_per_image=fwd, train_flops_per_image=3 * fwd,
               fwd_macs_breakdown={k: v for k, v in macs.items() if k != "total"})
    log(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters, forward {macs['total'] / 1e9:.2f} GMACs "
        f"= {fwd / 1e9:.2f} GFLOPs per image")

    # ------------------------------------------------------------------ training
    if not args.skip_train:
        log(f"training: batch {args.batch_size}, {args.train_warmup} warm-up + {args.train_iters} timed steps")
        check = paired_peak()
        r = run_train(args, model, optimizer, cond_impl, device, log, check)
        r["train_flops_per_s"] = r["train_images_per_s"] * 3 * fwd
        r["train_frac_of_peak"] = None if peak is None else r["train_flops_per_s"] / peak
        times = r.pop("train_times")
        if check is not None:
            r.update(check.summary("train", args.batch_size * 3 * fwd, times, log))
        rec.update(r, train_batch_size=args.batch_size, train_iters=args.train_iters)

    # ------------------------------------------------------------------ sampling
    if not args.skip_sample:
        evals = sampling_evaluations(model)
        log(f"sampling: batch {args.gen_bsz}, {args.sampling_method} {args.sampling_steps} steps, cfg {args.cfg} on "
            f"({args.interval_min}, {args.interval_max}): {evals} network evaluations per image")
        check = paired_peak()
        r = run_sample(args, model, cond_impl, device, log, check)
        r["sample_flops_per_image"] = evals * fwd
        r["sample_flops_per_s"] = r["sample_images_per_s"] * evals * fwd
        r["sample_frac_of_peak"] = None if peak is None else r["sample_flops_per_s"] / peak
        times = r.pop("sample_times")
        if check is not None:
            r.update(check.summary("sample", args.gen_bsz * evals * fwd, times, log))
        # full-schedule estimate: FLOP/s per evaluation carry over, the time scales with the evaluations
        full = sampling_evaluations(model, steps=50, method="heun")
        r["sample_images_per_s_heun50_est"] = r["sample_images_per_s"] * evals / full
        rec.update(r, sample_batch_size=args.gen_bsz, sample_steps=args.sampling_steps,
                   sampling_method=args.sampling_method, cfg=args.cfg,
                   cfg_interval=[args.interval_min, args.interval_max], sample_iters=args.sample_iters,
                   heun50_evals_per_image=full)
    rec["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    # ------------------------------------------------------------------ table
    log("")
    log(f"{'':28s}{'value':>24s}")
    rows = [("params", f"{n_params / 1e6:.2f} M"),
            ("forward / image", f"{macs['total'] / 1e9:.2f} GMACs ({fwd / 1e9:.1f} GFLOPs)"),
            ("GEMM peak", "-" if peak is None else
             f"{fmt_rate(peak)} ({rec['gemm_dtype']} {rec['gemm_peak_size']} {rec['gemm_peak_layout']})")]
    if not args.skip_train:
        rows += [("train images/s", f"{rec['train_images_per_s']:.3f}"),
                 ("train step", f"{rec['train_step_s']:.3f} s (batch {args.batch_size})"),
                 ("train model FLOP/s", fmt_rate(rec["train_flops_per_s"])),
                 ("train cpu util", "-" if rec["train_cpu_util"] is None else f"{rec['train_cpu_util']:.2f}"),
                 ("train / GEMM peak", "-" if peak is None else f"{100 * rec['train_frac_of_peak']:.1f} %"),
                 ("train / paired GEMM peak", "-" if rec.get("train_frac_of_paired_peak") is None
                  else f"{100 * rec['train_frac_of_paired_peak']:.1f} % (median)"),
                 ("train peak memory", f"{fmt_bytes(rec['train_peak_mem_bytes'])}"
                  + (f" (+{fmt_bytes(rec['train_peak_mem_delta_bytes'])})"
                     if rec["train_peak_mem_delta_bytes"] is not None else ""))]
    if not args.skip_sample:
        rows += [("sample images/s", f"{rec['sample_images_per_s']:.4f} ({rec['sample_evals_per_image']} evals/img)"),
                 ("sample images/s Heun-50 est", f"{rec['sample_images_per_s_heun50_est']:.4f} "
                                                 f"({rec['heun50_evals_per_image']} evals/img)"),
                 ("sample model FLOP/s", fmt_rate(rec["sample_flops_per_s"])),
                 ("sample cpu util", "-" if rec["sample_cpu_util"] is None else f"{rec['sample_cpu_util']:.2f}"),
                 ("sample / GEMM peak", "-" if peak is None else f"{100 * rec['sample_frac_of_peak']:.1f} %"),
                 ("sample / paired GEMM peak", "-" if rec.get("sample_frac_of_paired_peak") is None
                  else f"{100 * rec['sample_frac_of_paired_peak']:.1f} % (median)"),
                 ("sample peak memory", f"{fmt_bytes(rec['sample_peak_mem_bytes'])}"
                  + (f" (+{fmt_bytes(rec['sample_peak_mem_delta_bytes'])})"
                     if rec["sample_peak_mem_delta_bytes"] is not None else ""))]
    for name, value in rows:
        log(f"{name:28s}{value:>24s}" if len(value) <= 24 else f"{name:28s}{value}")
    if "peak_mem_kind" in rec:
        log(f"(memory: {rec['peak_mem_kind']})")

    if args.profile:
        profile(args, model, optimizer, cond_impl, device, log)

    line = json.dumps(rec, sort_keys=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return rec


def profile(args, model, optimizer, cond_impl, device, log):
    """One extra training step or generate() call under torch.profiler; ops grouped by name."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if args.profile == "train":
        model.train(True)
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = (torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=gen) * 2 - 1).to(device)
        cond = cond_impl.train_inputs(args.batch_size, gen)
        with torch_profile(activities=activities) as prof:
            train_step(model, optimizer, cond_impl, x, cond, device, args.precision)
            synchronize(device)
    else:
        model.eval()
        cond = cond_impl.sample_inputs(args.gen_bsz)
        with torch_profile(activities=activities) as prof:
            with autocast(device, args.precision):
                cond_impl.generate(model, cond)
            synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by=sort, row_limit=30))


if __name__ == "__main__":
    main()
