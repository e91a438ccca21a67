"""Measurement helpers of bench.py: dense-GEMM peak, timed calls, model FLOPs, peak memory and loader throughput."""
import os
import platform
import re
import statistics
import time

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils import benchmark as torch_benchmark
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

import model_jit
from util.misc import autocast


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


def cpu_seconds():
    """User + system CPU time of this process. On a CPU, (CPU seconds) / (wall seconds x threads) of a phase well
    below 1 means other processes took cores from the benchmark, and its rates are then too low."""
    return time.process_time()


# ---------------------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn):
    """FLOPs (2 per multiply-accumulate of matmuls, convolutions and attention) of fn(), by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(model, img_size, batch_size=2):
    """Per-image FLOPs of a Denoiser (on the meta device: shapes only, no memory): 'forward' of the network,
    'train' the loss forward + backward of a training step, 'sample' one generate() call (its network evaluations,
    Denoiser.network_evaluations, times 'forward'). FlopCounterMode sees inside the attention only on meta tensors
    (on a CPU the fused kernel is opaque to it)."""
    x = torch.zeros(batch_size, 3, img_size, img_size, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    t = torch.full((batch_size,), 0.5, device="meta")
    with torch.no_grad():
        forward = count_flops(lambda: model.net(x, t, labels)) / batch_size
    train = count_flops(lambda: model(x, labels).backward()) / batch_size
    return {"forward": forward, "train": train, "sample": forward * model.network_evaluations()}


# ---------------------------------------------------------------------------------------------------------- memory
def saved_for_backward_bytes(model, batch_size, img_size, precision):
    """Bytes of the tensors a Denoiser's training forward on the CPU (bf16 autocast or fp32, as --precision) keeps
    for its backward, each storage once and parameters excepted: its activation memory, with attention in torch's
    fused kernel as on a GPU (no tokens x tokens matrices kept). Run it on fake tensors."""
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}  # storages held until the sum: a freed one's address could be reused by another

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage
        return tensor

    x = torch.zeros(batch_size, 3, img_size, img_size)
    labels = torch.zeros(batch_size, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast(x.device, precision), \
            model_jit.cpu_attention("fused"):
        model(x, labels)
    return sum(storage.nbytes() for storage in saved.values())


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of one phase: CUDA max_memory_allocated; CPU the process peak RSS (VmHWM, reset at the start of
    the phase through /proc/self/clear_refs; else psutil's RSS at the end) and its increase over the RSS at the
    start; MPS the driver-allocated memory at the end."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.start_rss = psutil.Process().memory_info().rss
        self.resettable = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        elif self.device.type == "cpu":
            try:  # "5" resets the peak RSS (VmHWM) of this process, Linux >= 4.0
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.resettable = _status_kib("VmHWM") is not None
            except OSError:
                pass
            self.kind = ("cpu process peak RSS (VmHWM, reset at phase start)" if self.resettable
                         else "cpu process RSS at phase end")
        else:
            self.kind = f"{self.device.type} driver allocated at phase end"
        return self

    def __exit__(self, *exc):
        self.delta = None
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "cpu":
            self.peak = _status_kib("VmHWM") * 1024 if self.resettable else psutil.Process().memory_info().rss
            self.delta = max(0, self.peak - self.start_rss)
        elif self.device.type == "mps":
            self.peak = torch.mps.driver_allocated_memory()
        else:
            self.peak = None
        return False


# ---------------------------------------------------------------------------------------------------------- GEMM peak
def gemm_rate(device, dtype, n, layout, min_time):
    """FLOP/s of n x n x n GEMMs ("nn": A @ B, "nt": A @ B^T as nn.Linear runs), sustained over >= min_time seconds
    of back-to-back calls (torch.utils.benchmark), and of the fastest block of calls."""
    gen = torch.Generator().manual_seed(0)  # own generator: must not move the RNG the timed steps draw from
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    stmt = "torch.mm(a, b)" if layout == "nn" else "torch.mm(a, b.t())"
    cpu0 = cpu_seconds()
    timer = torch_benchmark.Timer(stmt, globals={"a": a, "b": b, "torch": torch},
                                  num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    seconds = m.number_per_run * len(m.times) * m.mean
    flops = 2.0 * n ** 3
    util = (cpu_seconds() - cpu0) / (seconds * torch.get_num_threads()) if device.type == "cpu" else None
    return dict(size=n, layout=layout, iters=m.number_per_run * len(m.times), seconds=seconds,
                flops_per_s=flops / m.mean, best_call_flops_per_s=flops / min(m.times), cpu_util=util)


def measure_gemm_peak(device, dtype, sizes, min_time=2.0, max_call_s=20.0, log=print):
    """Dense-GEMM peak: the best sustained rate (gemm_rate) over the sizes and both layouts. Sustained, like the
    model's rate over whole steps (a short call can catch a momentarily idle machine). A size whose single call is
    predicted, from the previous size, to take longer than max_call_s is skipped (slow dtypes stay bounded)."""
    results, rate_by_layout = [], {}
    for n in sorted(sizes):
        for layout in ("nn", "nt"):
            previous = rate_by_layout.get(layout)
            if previous is not None and 2.0 * n ** 3 / previous > max_call_s:
                log(f"  gemm {n:5d} {layout}: skipped (a call would take ~{2.0 * n ** 3 / previous:.0f} s)")
                continue
            r = gemm_rate(device, dtype, n, layout, min_time)
            rate_by_layout[layout] = r["flops_per_s"]
            results.append(r)
            log(f"  gemm {n:5d} {layout}: {r['flops_per_s'] / 1e9:10.2f} GFLOP/s sustained ({r['iters']} calls, "
                f"{r['seconds']:.2f} s; best block {r['best_call_flops_per_s'] / 1e9:.2f}"
                + ("" if r["cpu_util"] is None else f", cpu util {r['cpu_util']:.2f}") + ")")
    return max(results, key=lambda r: r["flops_per_s"]) if results else None, results


class PairedPeak:
    """The peak GEMM re-measured around every timed iteration (before each one and after the last): on a shared or
    clock-varying machine the GEMM rate drifts by tens of percent within minutes, so each iteration is compared
    with the peak measured seconds around it, not minutes before."""

    def __init__(self, device, dtype, best, seconds):
        self.measure = lambda: gemm_rate(device, dtype, best["size"], best["layout"], seconds)["flops_per_s"]
        self.rates = []

    def __call__(self):
        self.rates.append(self.measure())

    def summary(self, phase, flops_per_iteration, times, log):
        """Each iteration's FLOP/s over the mean of the peaks just before and after it: <phase>_frac_of_paired_peak
        (the median), ..._all and the peaks."""
        fractions = [flops_per_iteration / t / ((self.rates[i] + self.rates[i + 1]) / 2) for i, t in enumerate(times)]
        log(f"  {phase}: {' '.join(f'{100 * f:.1f}%' for f in fractions)} of the peak GEMM measured around each "
            f"timed iteration ({' '.join(f'{r / 1e9:.1f}' for r in self.rates)} GFLOP/s)")
        return {f"{phase}_frac_of_paired_peak": statistics.median(fractions),
                f"{phase}_frac_of_paired_peak_all": fractions, f"{phase}_paired_peak_flops_per_s": self.rates}


# ---------------------------------------------------------------------------------------------------------- timing
def timed_calls(count, call, describe=None, log=print, peak_check=None):
    """call() count times, each one timed by torch.utils.benchmark's clock (it synchronises the accelerator; a
    Timer would add two untimed calls per measurement, and a training step is long and stateful); describe(i,
    seconds, result) -> a line to log; peak_check() before every call and after the last. Returns (seconds of each
    call, process CPU seconds inside the calls, the last result)."""
    times, cpu_total, result = [], 0.0, None
    for i in range(count):
        if peak_check is not None:
            peak_check()
        start, cpu0 = torch_benchmark.timer(), cpu_seconds()
        result = call()
        times.append(torch_benchmark.timer() - start)
        cpu_total += cpu_seconds() - cpu0
        if describe is not None:
            log(describe(i, times[-1], result))
    if count and peak_check is not None:
        peak_check()
    return times, cpu_total, result


# ---------------------------------------------------------------------------------------------------------- loader
def photo_folder(root, count, size=(500, 375), quality=90, classes=4, grain=3.0):
    """An ImageFolder (<root>/train/c<k>/*.JPEG) of `count` JPEGs of ImageNet-typical size and quality: crops of the
    photographs shipped with scikit-image (no download), resized to `size`, with Gaussian grain of std `grain` (the
    sensor noise of real photos: without it the smooth resized crops compress to a third of an ImageNet JPEG's
    ~110 KB, and entropy decoding gets cheaper), saved at `quality`. Returns root."""
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB")
              for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")]
    rng = np.random.default_rng(0)
    aspect = size[0] / size[1]
    for i in range(count):
        photo = photos[i % len(photos)]
        w = int(min(photo.width, photo.height * aspect) * rng.uniform(0.6, 1.0))
        h = int(w / aspect)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        folder = os.path.join(root, "train", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        pixels = np.asarray(photo.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC), np.float32)
        pixels = np.clip(pixels + rng.normal(0, grain, pixels.shape), 0, 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i:05d}.JPEG"), quality=quality)
    return root


def loader_rate(dataset, min_cpu_seconds=2.0, batch_size=32, seed=0):
    """Images per CPU-second of one loader process, over batches of randomly drawn samples until min_cpu_seconds
    of CPU time (num_workers=0: the main process does what one worker does, collation included; not the transfer
    of the batch to the training process). CPU seconds, not wall seconds: on a shared machine they are what a
    dedicated worker core would take. Returns (images per CPU-second, images per wall-second)."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker runs single-threaded (torch sets 1 thread in DataLoader workers)
    try:
        seen, start, cpu0 = 0, time.perf_counter(), cpu_seconds()
        while cpu_seconds() - cpu0 < min_cpu_seconds:
            seen += sum(len(labels) for _, labels in loader)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    finally:
        torch.set_num_threads(threads)
    return seen / cpu, seen / wall
