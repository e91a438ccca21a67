"""Distributed setup, seeding and small helpers shared by main_jit.py and engine_jit.py."""
import builtins
import ctypes
import datetime
import logging
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks unless called with force=True."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print(f"[{now}]", *args, **kwargs)

    builtins.print = print


def init_distributed_mode(args):
    """Set args.rank/world_size/gpu/distributed from torchrun, SLURM or OpenMPI; single process otherwise."""
    if args.dist_on_itp:
        args.rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
        args.world_size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        os.environ["LOCAL_RANK"] = str(args.gpu)
        os.environ["RANK"] = str(args.rank)
        os.environ["WORLD_SIZE"] = str(args.world_size)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ["LOCAL_RANK"])
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        setup_for_distributed(True)
        return
    args.distributed = True
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if on_cuda else "gloo"
    print(f"| distributed init (rank {args.rank}, world {args.world_size}, {backend}): {args.dist_url}", flush=True)
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def default_device():
    """The --device of the tools that leave it unset: cuda if available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device=None, gpu=None):
    """torch.device for this process from --device (None: default_device()), with a one-line error when it is not
    available; gpu is this rank's GPU under torch.distributed (else the current CUDA device)."""
    device = device or default_device()
    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        return torch.device("cuda", torch.cuda.current_device() if gpu is None else gpu)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    if kind not in ("cpu", "mps"):
        raise SystemExit(f"--device {device}: expected cpu, cuda or mps")
    return torch.device(kind)


def keep_freed_cpu_memory(device):
    """On a CPU device, make glibc keep freed memory for reuse instead of returning it to the OS.

    glibc serves blocks above 32 MB (a JiT-B/16 batch-8 SwiGLU activation is 38 MB) with mmap and unmaps them when
    freed, so each step page-faults and zeroes those activations again (JiT-B/16 batch 8: 20-50K page faults per
    step in steady state, seconds of system time in the first steps; none with this). With mmap off and no
    trimming, the heap keeps them, as CUDA's caching allocator does on a GPU. Returns whether the setting applied
    (False for other devices and off glibc, e.g. macOS: nothing changes there)."""
    if device.type != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_mean(value):
    """Mean of a tensor over ranks (returns the tensor unchanged in a single process)."""
    if is_dist_avail_and_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= get_world_size()
    return value


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 natively (x86 AVX512_BF16 or AMX-BF16, Arm BF16) with torch's oneDNN kernels.
    Not oneDNN's own check alone: that accepts any AVX-512 CPU, where it emulates bf16 slower than fp32."""
    capabilities = torch.cpu.get_capabilities()
    native = any(capabilities.get(feature, False) for feature in ("avx512_bf16", "amx_bf16", "bf16"))
    return native and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision, device):
    """--precision auto: bf16 autocast on CUDA and MPS, and on CPUs with native bf16 matrix units; fp32 on other
    CPUs, where bf16 matmuls are emulated (measured ~50x slower per image on an AVX2-only CPU)."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16"


def autocast(device, precision):
    """bf16 autocast on any device when --precision bf16; a no-op context for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def param_groups_weight_decay(model, weight_decay):
    """AdamW groups: no weight decay for biases and 1-D tensors (norm weights); frozen tensors left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model, lr, weight_decay, device):
    """The release's AdamW (betas 0.9, 0.95, no decay on biases and norms), with torch's fused kernel on the devices
    that have one: one kernel per parameter instead of a dozen elementwise passes (JiT-B/16 on a CPU: ~0.2 s ->
    0.06 s per step)."""
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu", "mps"))


def cache_dir():
    """Where converted Inception weights and caption features are cached: $JIT_CACHE_DIR, else
    $XDG_CACHE_HOME/jit or ~/.cache/jit."""
    if os.environ.get("JIT_CACHE_DIR"):
        return os.environ["JIT_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jit")


# Redirected output (SLURM, `> log`): one progress line a minute at most, not a redraw per sampling step.
PROGRESS_INTERVAL_S = 60


class _OneLinePerReport:
    """A stream for tqdm that writes every report on its own line: tqdm redraws in place with '\\r', which a log
    file keeps as one ever longer line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, file=None, **kwargs):
    """tqdm for every progress bar of the repository: redrawn live on a terminal; into a file or a pipe at most one
    line per PROGRESS_INTERVAL_S (plus the first and the last), each on its own line. JIT_PROGRESS=live keeps the
    live redraw through a pipe (demo.py sets it when its own output is a terminal: it forwards its stages' output)."""
    stream = file or sys.stderr
    if not (stream.isatty() or os.environ.get("JIT_PROGRESS") == "live"):
        kwargs = {"mininterval": PROGRESS_INTERVAL_S, "maxinterval": PROGRESS_INTERVAL_S, **kwargs}
        stream = _OneLinePerReport(stream)
    return tqdm(iterable, file=stream, **kwargs)


class _CalmCudaHomeWarning(logging.Filter):
    """torch.utils.cpp_extension warns "No CUDA runtime is found, using CUDA_HOME=..." on every CPU machine that has a
    CUDA toolkit (nvcc) installed, as soon as torch.compile or torch.utils.benchmark loads it. On a CPU that is the
    expected case: replace it with one calm line, once."""
    shown = False

    def filter(self, record):
        if not str(record.msg).startswith("No CUDA runtime is found"):
            return True
        if not _CalmCudaHomeWarning.shown:
            _CalmCudaHomeWarning.shown = True
            print("note: no CUDA runtime on this machine, so torch.compile and C++ extensions build CPU code "
                  f"(the CUDA toolkit at {record.args[0] if record.args else '?'} is not used)", file=sys.stderr)
        return False


# installed when util.misc is imported, before anything loads torch.utils.cpp_extension (filters on a logger outlive
# its creation: getLogger returns the same object to cpp_extension later)
logging.getLogger("torch.utils.cpp_extension").addFilter(_CalmCudaHomeWarning())
