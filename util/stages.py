"""The stages of the demos (demo.py, demo_text.py): each a command line of this repository's tools, printed, run
with its output forwarded live; and the TensorBoard scalars the runs log, read back."""
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fmt_time(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def shown(cmd):
    """The command as a user would type it (python instead of the interpreter's full path)."""
    words = ["python" if c == sys.executable else c for c in cmd]
    return " ".join(w if re.fullmatch(r"[\w./:,=@+-]+", w) else repr(w) for w in words)


def run(cmd, env):
    """Run a command in the repository, forwarding its output live (progress bars included); returns the output.
    A failure stops the demo with the command and its exit code."""
    print(f"$ {shown(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    while True:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        chunks.append(chunk)
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    proc.wait()
    output = b"".join(chunks).decode("utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: this command failed (exit code {proc.returncode}):"
                         f"\n  {shown(cmd)}")
    return output


def read_scalars(log_dir, tag="train_loss"):
    """[(step, value)] of a scalar in the TensorBoard event files of log_dir (last value per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    files = sorted(f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents"))
    for name in files:
        acc = EventAccumulator(os.path.join(log_dir, name), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values.update((e.step, e.value) for e in acc.Scalars(tag))
    return sorted(values.items())


def tool_env():
    """The environment of a tool run by a demo or gpu_check.py: nothing downloads, output arrives as it is printed,
    and no SLURM variables: in an sbatch script (SLURM_PROCID 0, SLURM_NTASKS of the job) a single-process command
    would take itself for one of the job's srun tasks and wait for the others."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    env.update(JIT_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def start(args, out):
    """Device, autocast precision and the environment of the stage commands (offline, unbuffered); makes out.
    torch is imported here, after argument parsing, so that --help stays fast."""
    import torch

    import util.misc as misc

    device = args.device or misc.default_device()
    precision = misc.resolve_precision(args.precision, torch.device(device.split(":")[0]))
    print(f"device {device}, precision {precision}, output folder {out}")
    os.makedirs(out, exist_ok=True)
    env = tool_env()
    if sys.stdout.isatty():  # the stages write into our pipe; their progress bars should still redraw live
        env["JIT_PROGRESS"] = "live"
    return device, precision, env


def stage(name, title):
    """Announce a stage; returns its start time."""
    print(f"\n=== {name}: {title} ===", flush=True)
    return time.time()
