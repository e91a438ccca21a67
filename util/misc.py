"""Distributed set-up, devices, seeding, kernels, atomic writes, progress bars: small helpers of every tool."""
import builtins
import ctypes
import datetime
import json
import logging
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from util.preemption import PREEMPTED_EXIT_CODE


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


# Under srun without MASTER_PORT: every task of a job derives the same port from SLURM_JOB_ID, in 20000-29999 (below
# Linux's ephemeral ports, from 32768, which outgoing connections take)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


def slurm_first_host(nodelist):
    """The first host of a SLURM node list in its compressed form ("gpu[03-05,09],cpu01" -> "gpu03",
    "rack[1-2]-node[01-04]" -> "rack1-node01"); ValueError when it is not one."""
    entry = re.match(r"(?:[^,\[\]]|\[[^\[\]]+\])+", nodelist)  # up to the first comma outside brackets
    rest = nodelist[entry.end():] if entry else nodelist
    if entry is None or not (rest == "" or rest.startswith(",")):
        raise ValueError(f"not a SLURM node list: {nodelist!r}")
    host = re.sub(r"\[([^\]]+)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry.group(0))
    if not re.fullmatch(r"[\w.-]+", host):
        raise ValueError(f"not a SLURM node list: {nodelist!r}")
    return host


def slurm_tasks_on_node(tasks_per_node, node_id):
    """Entry node_id of SLURM_TASKS_PER_NODE ("4(x2),2": 4 tasks on nodes 0 and 1, 2 on node 2)."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"not a SLURM task count list: {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"{tasks_per_node!r} has no entry for node {node_id}")
    return counts[node_id]


def _slurm_env(name):
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set: srun sets it for every task; launch with srun (one task per GPU)")
    return value


def slurm_environment():
    """What srun gives each task, in torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), for env:// and the loader's CPU share; those already set are kept. One line naming
    the variable when one is missing or unreadable."""
    rank, world_size = _slurm_env("SLURM_PROCID"), _slurm_env("SLURM_NTASKS")
    local_rank = _slurm_env("SLURM_LOCALID")
    if "LOCAL_WORLD_SIZE" not in os.environ:
        if os.environ.get("SLURM_NTASKS_PER_NODE"):
            local_world_size = os.environ["SLURM_NTASKS_PER_NODE"]
        else:
            tasks = _slurm_env("SLURM_TASKS_PER_NODE")
            try:
                local_world_size = slurm_tasks_on_node(tasks, int(os.environ.get("SLURM_NODEID", 0)))
            except ValueError as e:
                raise SystemExit(f"SLURM_TASKS_PER_NODE: {e}")
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    if "MASTER_ADDR" not in os.environ:
        name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST") if os.environ.get(n)),
                    None)
        if name is None:
            raise SystemExit("SLURM_NODELIST is not set: cannot tell rank 0's node; set MASTER_ADDR to its host name")
        try:
            os.environ["MASTER_ADDR"] = slurm_first_host(os.environ[name])
        except ValueError as e:
            raise SystemExit(f"{name}: {e}; set MASTER_ADDR to rank 0's host name")
    if "MASTER_PORT" not in os.environ:
        job_id = _slurm_env("SLURM_JOB_ID")
        if not job_id.isdigit():
            raise SystemExit(f"SLURM_JOB_ID {job_id}: not a number; set MASTER_PORT")
        os.environ["MASTER_PORT"] = str(SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN)
    os.environ.update(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=local_rank)


def init_distributed_mode(args):
    """Set args.rank/world_size/gpu/distributed from torchrun, SLURM (srun) or OpenMPI and join the process group
    (NCCL on CUDA, else gloo; collectives time out after --dist_timeout minutes); single process otherwise."""
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
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        slurm_environment()
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        # per-task CUDA_VISIBLE_DEVICES (--gpus-per-task) leaves each task one visible GPU: index 0
        args.gpu = int(os.environ["LOCAL_RANK"]) % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        setup_for_distributed(True)
        return
    args.distributed = True
    device = resolve_device(args.device, args.gpu)  # a device this rank cannot use is one line, before any waiting
    on_cuda = device.type == "cuda"
    backend = "nccl" if on_cuda else "gloo"
    where = (f"env://{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if args.dist_url == "env://"
             else args.dist_url)
    print(f"| distributed init (rank {args.rank}, world {args.world_size}, {backend} on {device}, timeout "
          f"{args.dist_timeout:g} min): {where}", flush=True)
    try:
        # device_id: NCCL forms its communicator now, on this GPU, instead of at the first collective
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                                rank=args.rank, timeout=datetime.timedelta(minutes=args.dist_timeout),
                                device_id=device if on_cuda else None)
        dist.barrier()
    except (RuntimeError, ValueError) as e:  # DistError is a RuntimeError; ValueError: env:// lacking a variable
        close_process_group(agreed=False)
        raise SystemExit(f"rank {args.rank}: could not join the {args.world_size} ranks at {where} within "
                         f"--dist_timeout {args.dist_timeout:g} min ({str(e).strip().splitlines()[0]}); check that "
                         f"every rank was started and can reach that address") from None
    setup_for_distributed(args.rank == 0)
    if restarts_reuse_the_rendezvous_store():
        print("warning: torchrun --max-restarts shares its rendezvous store with the ranks, so restarted ranks can read "
              "the previous attempt's addresses and fail to connect or hang (pytorch/pytorch#135712); start torchrun "
              "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts that rejoin")


def restarts_reuse_the_rendezvous_store():
    """torchrun will restart the ranks (--max-restarts > 0) and they join its rendezvous store, which keeps every
    attempt's keys: torch 2.14 adds no per-attempt prefix, so a restarted rank may read a dead rank's address."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0)


@contextmanager
def distributed_mode(args):
    """init_distributed_mode(args) for the block, and the process group closed on every way out of it. A normal end
    and the preemption exit (every rank stops at the same step) destroy it, which first completes this rank's
    pending collectives; any other exit may be one rank's alone, while its peers wait in a collective it will never
    join, so it aborts the group instead (NCCL: ncclCommAbort, which does not wait for them)."""
    init_distributed_mode(args)
    try:
        yield
    except SystemExit as e:
        close_process_group(agreed=e.code == PREEMPTED_EXIT_CODE)
        raise
    except BaseException:
        close_process_group(agreed=False)
        raise
    close_process_group(agreed=True)


def close_process_group(agreed):
    """destroy_process_group() when every rank is closing at this point (agreed), else abort this rank's groups."""
    if not is_dist_avail_and_initialized():
        return
    if agreed:
        dist.destroy_process_group()
    else:
        dist.distributed_c10d._abort_process_group()


def default_device():
    """The --device of the tools that leave it unset: cuda if available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device=None, gpu=None):
    """torch.device for this process from --device (None: default_device(); cuda:N honoured), made the current CUDA
    device; a one-line error when it is not available. gpu: this rank's GPU under torchrun / srun (its local rank),
    which takes the place of an index in --device."""
    device = device or default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device {device}: expected cpu, cuda or mps") from None
    kind = parsed.type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = gpu if gpu is not None else parsed.index if parsed.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            whose = f"local rank {gpu}'s GPU cuda:{gpu}" if gpu is not None else f"cuda:{index}"
            raise SystemExit(f"--device {device}: {whose} does not exist; {count} CUDA device(s) visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        torch.cuda.set_device(index)  # kernels, allocations and NCCL of calls that name no device go there too
        return torch.device("cuda", index)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    if kind not in ("cpu", "mps"):
        raise SystemExit(f"--device {device}: expected cpu, cuda or mps")
    return torch.device(kind)


def available_cpus():
    """CPUs this process may run on: its affinity set (SLURM and cgroup CPU sets, taskset), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_per_process():
    """This process's share of available_cpus(), for its loader workers: divided among the processes of its node
    (LOCAL_WORLD_SIZE) that share the set, which torchrun's always do; an srun task gets SLURM_CPUS_PER_TASK, whether
    srun bound each task to its own CPUs (its set is then that size) or not (its set is the job's on the node)."""
    cpus = available_cpus()
    srun_task = "SLURM_PROCID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ  # torchrun sets the latter
    if srun_task and os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, min(cpus, int(os.environ["SLURM_CPUS_PER_TASK"])))
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def keep_freed_cpu_memory(device):
    """On a CPU device, make glibc keep freed blocks for reuse, as CUDA's caching allocator does, instead of unmapping
    those above 32 MB (a step's largest activations) at every free (README, Benchmark). Returns whether it applied."""
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
    """--precision auto: bf16 autocast on GPUs that compute it natively (CUDA compute capability 8.0 and up) and MPS,
    and on CPUs with native bf16 matrix units; fp32 on other CPUs and GPUs, where bf16 matmuls are emulated (measured
    ~50x slower per image on an AVX2-only CPU)."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return "bf16"
        print(f"--precision auto: fp32, as {torch.cuda.get_device_name(device)} has no native bf16 (compute "
              f"capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, below 8.0)")
        return "fp32"
    return "bf16"


def autocast(device, precision):
    """bf16 autocast on any device when --precision bf16; a no-op context for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def configure_kernels(args, device):
    """--compile's default, on for CUDA only (a CPU run would pay minutes of compilation), and on CUDA cuDNN's
    autotuner for the patch embedding's convolutions, as the release; TF32 stays at torch's defaults."""
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_network(net, backend="inductor"):
    """torch.compile each JiTBlock and the FinalLayer in place (state_dict unchanged), as the release; the condition
    embedder (a -Text caption lookup's .tolist()) stays eager. Dynamic sizes: only a batch of 1 compiles anew."""
    # the release's cache_size_limit: all blocks share one code object, with an entry per variant (training or
    # sampling, dropout or not, tokens before or after the in-context ones, ...)
    torch._dynamo.config.recompile_limit = 128
    torch._dynamo.config.optimize_ddp = False  # as the release; DDP wraps the compiled blocks (main), never traced
    for module in [*net.blocks, net.final_layer]:
        module.compile(backend=backend, dynamic=True)


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
    that have one: one kernel per parameter instead of a dozen elementwise passes (README, Benchmark)."""
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu", "mps"))


def cache_dir():
    """Where converted Inception weights and caption features are cached: $JIT_CACHE_DIR, else
    $XDG_CACHE_HOME/jit or ~/.cache/jit."""
    if os.environ.get("JIT_CACHE_DIR"):
        return os.environ["JIT_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jit")


def _fsync(path):
    fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, sync_folder=False):
    """Yields a temporary path beside `path` to write a file (or folder) to; it is then fsynced and renamed over
    `path`, so readers and crashes see the old or the new one, never a torn one. Removed if the block fails."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        if os.path.isdir(tmp):
            try:  # a folder's entries, where the system allows opening a folder (not Windows)
                _fsync(tmp)
            except OSError:
                pass
        else:
            _fsync(tmp)  # the data on disk before the new name points at it
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise
    if sync_folder:
        try:  # the rename itself made durable; a folder that cannot be fsynced (some network file systems,
            # Windows) must not turn a completed write into a reported failure
            _fsync(os.path.dirname(os.path.abspath(path)))
        except OSError:
            pass


def write_json(path, value):
    """`value` as JSON (UTF-8, non-ASCII kept) at `path`, written atomically (atomic_write)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)


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


def progress_bar(iterable=None, file=None, **kwargs):
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
