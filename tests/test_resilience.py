"""Runs that survive: atomic checkpoints under SIGKILL, exact resume, SIGTERM preemption under torchrun, divergence,
bad data and bad configuration."""
import glob
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import util.misc as misc
from denoiser import Denoiser
from main_jit import load_fid_stats, resume
from util.args import check_config, get_args_parser
from util.checkpoint import read_checkpoint, save_checkpoint
from util.data import ImageSamples, check_data, load_rgb, train_transform
from util.preemption import PREEMPTED_EXIT_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]


def train_cmd(data, out, *extra):
    return [sys.executable, "main_jit.py", *TINY, "--data_path", str(data), "--output_dir", str(out),
            "--batch_size", "4", "--num_workers", "0", "--epochs", "3", "--warmup_epochs", "1", "--blr", "1e-2",
            "--log_freq", "1", "--save_every_minutes", "1e-6", *map(str, extra)]


def step_losses(log):
    """{(epoch, step): 'loss value'} from the log lines 'Epoch [e] [s/n] loss x ...'."""
    losses = {}
    for line in log.splitlines():
        if "] loss " in line and "Epoch [" in line:
            head = line.split("Epoch [")[1]
            epoch = int(head.split("]")[0])
            step = int(head.split("[")[1].split("/")[0])
            losses[(epoch, step)] = line.split(" loss ")[1].split()[0]
    return losses


class Running:
    """A subprocess whose combined output is collected by a thread; .log is the output so far."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self.reader.start()

    @property
    def log(self):
        return "".join(self.lines)

    def wait_for(self, condition, timeout=300, poll=0.001):
        start = time.time()
        while self.proc.poll() is None and not condition(self.log) and time.time() - start < timeout:
            time.sleep(poll)
        return condition(self.log)

    def finish(self, timeout=120):
        code = self.proc.wait(timeout=timeout)
        self.reader.join()
        return code


def run_until(cmd, kill_when):
    """Start cmd; SIGKILL it as soon as kill_when(log_so_far) is true (polled every ms). Returns the log; fails
    unless the condition was met and the kill is what ended the process."""
    run = Running(cmd)
    fired = run.wait_for(kill_when)
    run.proc.send_signal(signal.SIGKILL)
    code = run.finish()
    assert fired and code == -signal.SIGKILL, f"exit status {code}, kill condition met: {fired}\n{run.log}"
    return run.log


def assert_same_checkpoint(a, b):
    for key in ("model", "model_ema1", "model_ema2"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name}"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index} {name}"
    assert a["epoch"] == b["epoch"]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_uninterrupted_run(image_folder, tmp_path):
    reference = subprocess.run(train_cmd(image_folder, tmp_path / "ref"), cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    expected = step_losses(reference.stdout + reference.stderr)
    assert len(expected) == 12  # 3 epochs x 4 steps

    out = tmp_path / "killed"
    temporaries = lambda: glob.glob(str(out / "checkpoint-last.pth.tmp.*"))  # noqa: E731
    # the temporary file exists only between the open and the rename of a write (here 0.2-1.3 s for the 84 MB
    # checkpoint, polled every ms): a kill as soon as it appears lands inside the write, which its leftover proves
    kill_points = [
        ("mid-epoch", lambda log: "Epoch [0] [2/4]" in log),
        ("inside a checkpoint write", lambda log: "Epoch [1] [1/4]" in log and bool(temporaries())),
        ("right after an epoch boundary", lambda log: "Epoch [2] [1/4]" in log),
    ]
    losses = {}
    for where, kill_when in kill_points:
        log = run_until(train_cmd(image_folder, out, "--resume", out), kill_when)
        losses.update(step_losses(log))
        if where == "inside a checkpoint write":
            assert temporaries(), "the kill came after the write had finished"
        ckpt = read_checkpoint(out / "checkpoint-last.pth")  # never torn: always loadable
        assert "resume_state" in ckpt, where
    final = subprocess.run(train_cmd(image_folder, out, "--resume", out), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    losses.update(step_losses(final.stdout + final.stderr))
    assert "continuing at epoch" in final.stdout + final.stderr
    assert not glob.glob(str(out / "*.tmp.*"))  # a killed write's temporary file is cleaned up
    assert losses == expected
    assert_same_checkpoint(read_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"),
                           read_checkpoint(out / "checkpoint-last.pth"))


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_exits_with_documented_status(image_folder, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_jit.py",
           *TINY, "--data_path", str(image_folder), "--output_dir", str(out), "--batch_size", "1",
           "--num_workers", "1", "--epochs", "50", "--log_freq", "1"]
    run = Running(cmd)
    assert run.wait_for(lambda log: "Epoch [0] [2/8]" in log, poll=0.05), run.log
    run.proc.send_signal(signal.SIGTERM)  # to the launcher, as Kubernetes does; torchrun forwards it to the ranks
    assert run.finish() == 1  # torchrun itself, having been signalled, exits 1 after its ranks exit 75
    log = run.log
    assert log.count(f"exiting with status {PREEMPTED_EXIT_CODE}") == 2, log
    ckpt = read_checkpoint(out / "checkpoint-last.pth")
    state = ckpt["resume_state"]
    assert state["epoch"] == 0 and 2 <= state["step"] < 8 and ckpt["epoch"] == -1  # mid-epoch
    assert len(state["rng"]) == 2
    resumed = subprocess.run(cmd[:-4] + ["--epochs", "1", "--resume", str(out), "--log_freq", "1"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing at epoch 0 step {state['step']}" in resumed.stdout + resumed.stderr
    assert read_checkpoint(out / "checkpoint-last.pth")["epoch"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_single_process_preemption_saves_and_exits_with_documented_status(image_folder, tmp_path, sig):
    run = Running(train_cmd(image_folder, tmp_path, "--epochs", "50", "--save_every_minutes", "0"))
    assert run.wait_for(lambda log: "Epoch [0] [1/4]" in log, poll=0.05), run.log
    run.proc.send_signal(sig)
    assert run.finish() == PREEMPTED_EXIT_CODE, run.log
    step = read_checkpoint(tmp_path / "checkpoint-last.pth")["resume_state"]["step"]
    assert step >= 1
    assert (f"preempted ({sig.name}) at epoch 0 step {step}: checkpoint-last.pth saved; exiting with status "
            f"{PREEMPTED_EXIT_CODE}") in run.log


# a full disk under util.checkpoint.save_checkpoint: part of the file is written, then the write fails
DISK_FULL = """
import errno, runpy, sys
import torch

def disk_full(obj, f, *args, **kwargs):
    f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")

torch.save = disk_full
sys.argv = sys.argv[1:]
runpy.run_path("main_jit.py", run_name="__main__")
"""


@pytest.mark.slow
def test_failed_saves_keep_the_previous_checkpoint_and_say_so(image_folder, tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    cmd = [sys.executable, "-c", DISK_FULL, *train_cmd(image_folder, tmp_path, "--epochs", "2", "--resume", tmp_path,
                                                       "--save_last_freq", "1")[1:]]
    args = get_args_parser().parse_args(cmd[4:])
    model = Denoiser(args)
    optimizer = misc.build_optimizer(model, 1e-4, 0.0, torch.device("cpu"))
    save_checkpoint(path, model, optimizer, 0, args)  # the previous checkpoint, as after epoch 0
    before = path.read_bytes()
    error = f"ERROR: could not write {path} (No space left on device); the previous one is kept unchanged"

    # epoch 1: every periodic save (each step) and the end-of-epoch save fail, training goes on; the final save
    # failing is fatal
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = full.stdout + full.stderr
    assert full.returncode == 1, log
    assert full.stderr.strip().splitlines()[-1] == (
        "the final checkpoint-last.pth of epoch 1 could not be written (see the error above)")
    assert "continuing at epoch 1 step 0" in log and "Epoch [1] [4/4]" in log
    assert [line.split("] ", 1)[-1] for line in log.splitlines() if "ERROR" in line] == [error] * 5  # 4 + 1
    assert path.read_bytes() == before and not glob.glob(str(tmp_path / "*.tmp.*"))

    # preemption: the failed save is not reported as saved, and the status is not the requeue status
    run = Running([*cmd, "--epochs", "50", "--save_every_minutes", "0"])
    assert run.wait_for(lambda log: "Epoch [1] [1/4]" in log, poll=0.05), run.log
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 1, run.log
    lines = run.log.strip().splitlines()
    assert lines[-2].endswith(error), run.log
    assert re.fullmatch(r"preempted \(SIGTERM\) at epoch 1 step [1-4]: checkpoint-last.pth could not be written "
                        r"\(see the error above\); exiting with status 1", lines[-1]), run.log
    assert "saved" not in run.log.split("received SIGTERM")[1]
    assert path.read_bytes() == before and not glob.glob(str(tmp_path / "*.tmp.*"))


@pytest.mark.slow
def test_divergence_stops_before_overwriting_the_checkpoint(image_folder, tmp_path):
    ok = subprocess.run(train_cmd(image_folder, tmp_path, "--epochs", "1", "--save_every_minutes", "0"), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    for lr, save_every, what in [("1e30", "0", "loss"), ("inf", "1e-6", "weights")]:
        # 1e30: huge but finite weights, the loss of the next step overflows; inf: NaN weights right away, caught
        # by the check that precedes every checkpoint write
        bad = subprocess.run(train_cmd(image_folder, tmp_path, "--epochs", "2", "--resume", tmp_path, "--lr", lr,
                                       "--save_every_minutes", save_every),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1
        message = bad.stderr.strip().splitlines()[-1]
        assert message.startswith(f"non-finite {what} at epoch 1 step "), message
        assert message.endswith("training stopped before any checkpoint was written with these weights")
        assert (tmp_path / "checkpoint-last.pth").read_bytes() == before


# ------------------------------------------------------------------ bad data

def test_image_modes_decode_to_correct_rgb(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    assert np.asarray(load_rgb(tmp_path / "16bit.png"))[0, :, 0].tolist() == [0, 128, 255]
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque pixel; the other one is fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.asarray(load_rgb(tmp_path / "rgba.png")).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    stored = io.BytesIO((tmp_path / "rgba.png").read_bytes())  # the bytes of a Hub data set row, no file on disk
    assert np.asarray(load_rgb(stored)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    Image.fromarray(np.full((2, 2), 77, np.uint8), "L").save(tmp_path / "gray.png")
    assert np.asarray(load_rgb(tmp_path / "gray.png")).tolist() == [[[77] * 3] * 2] * 2
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = np.asarray(load_rgb(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 40 and red[2] < 40
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert np.asarray(load_rgb(tmp_path / "palette.png"))[0, 0].tolist() == [0, 200, 0]
    Image.new("RGB", (10, 12), (1, 2, 3)).save(tmp_path / "small.png")
    upscaled = train_transform(32)(load_rgb(tmp_path / "small.png"))
    assert upscaled.shape == (3, 32, 32) and upscaled.dtype == torch.uint8


def test_a_transparent_png_decodes_the_same_on_every_path(tmp_path, make_args):
    """Class training (ImageFolder), captioned training (TextImageDataset) and prepare_ref.py read one decoder:
    a transparent region is white everywhere, never the colour hidden under alpha 0."""
    import prepare_ref
    from util.datasets import build_dataset, build_train_loader
    rgba = np.zeros((32, 32, 4), np.uint8)  # hidden colour under the transparent half: black
    rgba[:16, :] = (200, 30, 40, 255)  # opaque top half
    rgba[8:16, :, 3] = 128  # a half-transparent band
    expected = np.full((32, 32, 3), 255, np.uint8)
    expected[:8] = (200, 30, 40)
    expected[8:16] = np.round((np.array([200, 30, 40]) * 128 + 255 * 127) / 255)  # over white
    for folder in ("class/train/c0", "text/images", "text/captions"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "class" / "train" / "c0" / "a.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "text" / "images" / "a.png")
    (tmp_path / "text" / "captions" / "a.txt").write_text("透明な背景の赤い帯", encoding="utf-8")

    decoded = {}
    for kind, text in (("class", False), ("text", True)):
        args = make_args("--data_path", str(tmp_path / kind), "--batch_size", "1", "--num_workers", "0")
        args.rank, args.world_size = 0, 1
        images, _ = next(iter(build_train_loader(args, build_dataset(args, text))))  # the training loader's batch
        decoded[kind] = images[0]
    decoded["prepare_ref"] = prepare_ref.CroppedImages(prepare_ref.find_images(str(tmp_path / "text"))[1], 32)[0]
    for kind, image in decoded.items():
        pixels = image.permute(1, 2, 0).numpy().astype(int)
        assert image.dtype == torch.uint8 and np.abs(pixels - expected).max() <= 1, kind
    assert all(torch.equal(decoded["class"], image) for image in decoded.values())


@pytest.fixture
def bad_files(tmp_path):
    good = []
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 80, 0, 0)).save(tmp_path / f"good{i}.png")
        good.append((str(tmp_path / f"good{i}.png"), i))
    (tmp_path / "notimage.jpg").write_text("this is not an image")
    data = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    bad = [(str(tmp_path / "notimage.jpg"), 7), (str(tmp_path / "truncated.png"), 8)]
    return good, bad


def test_check_data_reports_or_skips_bad_files(bad_files):
    good, bad = bad_files
    samples = [good[0], bad[0], good[1], bad[1], good[2]]
    with pytest.raises(SystemExit) as e:
        check_data(samples, "error", num_workers=0, show_progress=False)
    message = str(e.value)
    assert message.splitlines()[0] == ("--check_data: 2 unreadable file(s); fix them or pass --on_bad_data skip:")
    assert bad[0][0] in message and bad[1][0] in message and good[0][0] not in message
    with pytest.warns(UserWarning, match="skipping 2 unreadable"):
        assert check_data(samples, "skip", num_workers=0, show_progress=False) == good


def test_lazy_bad_file_stops_or_is_replaced_without_shifting_labels(bad_files):
    good, bad = bad_files
    samples = [good[0], bad[0], good[1]]
    with pytest.raises(RuntimeError, match=r"notimage.jpg: unreadable image .*--on_bad_data skip"):
        ImageSamples(samples, train_transform(32), on_bad="error")[1]
    with pytest.warns(UserWarning, match="notimage.jpg: unreadable image"):
        image, label = ImageSamples(samples, train_transform(32), on_bad="skip")[1]
    assert label == good[1][1] and image[0, 0, 0].item() == 80  # the replacement carries its own label


def test_check_data_flag_in_a_run(image_folder, tmp_path):
    data = tmp_path / "data"
    os.makedirs(data / "train" / "a")
    for i in range(4):
        Image.new("RGB", (32, 32), (i, i, i)).save(data / "train" / "a" / f"{i}.png")
    (data / "train" / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    result = subprocess.run(train_cmd(data, tmp_path / "out", "--check_data", "--class_num", "1"), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "--check_data: 1 unreadable file(s)" in result.stderr and "broken.png" in result.stderr
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


# ------------------------------------------------------------------ bad configuration

def parse(*argv):
    return get_args_parser().parse_args(TINY + list(map(str, argv)))


def test_bad_configuration_messages(tmp_path):
    with pytest.raises(SystemExit, match=r"^--img_size 30 is not a multiple of the patch size 4 of JiT-T/4$"):
        check_config(parse("--img_size", 30, "--output_dir", tmp_path))
    with pytest.raises(SystemExit, match=r"^--num_images 7 is not a multiple of --class_num 2$"):
        check_config(parse("--evaluate_gen", "--num_images", 7, "--output_dir", tmp_path))
    with pytest.raises(SystemExit, match=r"^--fid_stats: .*missing.npz"):
        load_fid_stats(parse("--evaluate_gen", "--num_images", 8, "--fid_stats", tmp_path / "missing.npz",
                             "--output_dir", tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^--output_dir .*file/out: not writable"):
        check_config(parse("--output_dir", tmp_path / "file" / "out"))


def test_unknown_model_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "main_jit.py", "--model", "JiT-X/16"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --model: invalid choice: 'JiT-X/16'" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag,value", [("--model", "JiT-T/2"), ("--img_size", "64"), ("--class_num", "3")])
def test_resume_from_another_config_is_refused(tmp_path, flag, value):
    other = parse(flag, value)
    model = Denoiser(other)
    save_checkpoint(tmp_path / "checkpoint-last.pth", model, torch.optim.AdamW(model.parameters()), 0, other)
    args = parse("--resume", tmp_path)
    mine = Denoiser(args)
    with pytest.raises(SystemExit, match=rf"^--resume .*checkpoint-last.pth: the checkpoint has {flag} {value}, "
                                         rf"this run {flag} {getattr(args, flag[2:])}$"):
        resume(args, mine, torch.optim.AdamW(mine.parameters()), str(tmp_path / "checkpoint-last.pth"))
