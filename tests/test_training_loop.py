"""What main_jit.py's training loop actually does: the learning rate that reaches AdamW at every step, the random
horizontal flip (axis, rate, resume, periodic saves, --no_hflip), an online evaluation that leaves the training RNG
alone, a run that reads its checkpoint and statistics files once, and gradients freed before evaluation."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import engine_jit
import main_jit
import util.misc as misc
from conftest import run_main_in_process
from denoiser import Denoiser
from util import fid
from util.checkpoint import read_checkpoint
from util.stages import read_scalars

FORWARD = Denoiser.forward
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """<root>/train/{a,b}/*.png: 8 random 32 x 32 images per class (the crop keeps them whole; none is its own
    mirror image), and the same images as uint8 (16, 3, 32, 32) in the order of ImageFolder's samples."""
    root = tmp_path_factory.mktemp("flipdata")
    rng = np.random.default_rng(3)
    images = []
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for i in range(8):
            pixels = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / c / f"{i}.png")
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return root, torch.stack(images)


def run_main(argv, monkeypatch):
    """main_jit.main in this process with the tiny flags and `argv` (conftest.run_main_in_process)."""
    return run_main_in_process(main_jit.get_args_parser().parse_args(TINY + [str(a) for a in argv]), monkeypatch)


def test_learning_rate_reaching_the_optimizer(image_folder, tmp_path, monkeypatch):
    """Default lr = blr * batch_size * world_size / 256; per step, linear warm-up over the first epoch (fractional
    epochs: epoch + step / steps_per_epoch), then half-cycle cosine to min_lr. Read back from AdamW's param_groups
    just before each step, and from the TensorBoard 'lr' scalar, against the closed form written out here."""
    seen = []
    build = misc.build_optimizer

    def watched(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: seen.append({g["lr"] for g in opt.param_groups}))
        return optimizer

    monkeypatch.setattr(misc, "build_optimizer", watched)
    out = tmp_path / "lr"
    args = run_main(["--data_path", image_folder[0], "--output_dir", out, "--batch_size", 4, "--num_workers", 0,
                     "--epochs", 3, "--warmup_epochs", 1, "--blr", 2e-3, "--lr_schedule", "cosine", "--min_lr", 1e-5,
                     "--log_freq", 1], monkeypatch)
    base = 2e-3 * 4 * 1 / 256
    assert args.lr == base
    expected = []
    for epoch in range(3):
        for step in range(4):  # 16 images / batch 4
            e = epoch + step / 4
            expected.append(base * e if e < 1 else 1e-5 + (base - 1e-5) * 0.5 * (1 + math.cos(math.pi * (e - 1) / 2)))
    assert len(seen) == 12 and all(len(lrs) == 1 for lrs in seen)  # every group gets the same value
    assert [lrs.pop() for lrs in seen] == pytest.approx(expected, rel=1e-12, abs=0)
    logged = read_scalars(str(out), "lr")
    assert [step for step, _ in logged] == list(range(1, 13))
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)  # float32 in the event file


def test_random_flip_axis_and_rate():
    """random_flip mirrors along the width (last) axis, each image with probability 1/2 from the global RNG."""
    n = 20000
    x = torch.arange(n * 3 * 2 * 4, dtype=torch.float32).view(n, 3, 2, 4)
    torch.manual_seed(0)
    y = engine_jit.random_flip(x)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert ((y == x).flatten(1).all(1) | flipped).all()  # each image whole, or mirrored left-right
    assert abs(flipped.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)  # 5 sigma: 0.5 +- 0.018
    torch.manual_seed(0)
    assert torch.equal(engine_jit.random_flip(x), y)  # drawn from the (checkpointed) training RNG


def training_inputs(image_folder, out, monkeypatch, *extra):
    """Run main_jit.main and return the images the Denoiser was trained on, as uint8 (one tensor per step)."""
    seen = []

    def watched(model, x, labels, *args, **kwargs):
        seen.append(((x + 1) / 2 * 255).round().to(torch.uint8))
        return FORWARD(model, x, labels, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "forward", watched)
    run_main(["--data_path", image_folder, "--output_dir", out, "--batch_size", 4, "--num_workers", 0,
              "--warmup_epochs", 1, "--blr", 1e-2, "--log_freq", 4, *extra], monkeypatch)
    return seen


def flip_kinds(batches, images):
    """For each image the model saw: 'plain' or 'mirrored' (left-right) copy of a training image, else 'other'."""
    kinds = []
    for x in torch.cat(batches):
        plain = (images == x).flatten(1).all(1).any()
        mirrored = (images.flip(-1) == x).flatten(1).all(1).any()
        kinds.append("plain" if plain else "mirrored" if mirrored else "other")
    return kinds


def test_training_flips_left_right_identically_on_resume(image_folder, tmp_path, monkeypatch):
    from test_resilience import assert_same_checkpoint

    root, images = image_folder
    uninterrupted = training_inputs(root, tmp_path / "a", monkeypatch, "--epochs", 2)
    kinds = flip_kinds(uninterrupted, images)
    assert len(kinds) == 32 and "other" not in kinds  # no up-down flip, no other change
    assert 4 <= kinds.count("mirrored") <= 28  # p = 0.5 over 32 images: outside this with probability < 1e-4

    # stopped after epoch 0 and resumed: epoch 1 trains on the same images with the same flips
    first = training_inputs(root, tmp_path / "b", monkeypatch, "--epochs", 1)
    resumed = training_inputs(root, tmp_path / "b", monkeypatch, "--epochs", 2, "--resume", tmp_path / "b")
    assert len(first) == len(resumed) == 4
    for a, b in zip(uninterrupted, first + resumed, strict=True):
        assert torch.equal(a, b)

    # --save_every_minutes: train_one_epoch returns to main after every step here; main saves and restarts the
    # loader (2 persistent workers) at the next step: the same images, flips and final weights
    saves = []
    save = main_jit.save_checkpoint
    monkeypatch.setattr(main_jit, "save_checkpoint", lambda path, *a, **k: saves.append(path) or save(path, *a, **k))
    saving = training_inputs(root, tmp_path / "d", monkeypatch, "--epochs", 2, "--num_workers", 2,
                             "--save_every_minutes", 1e-6)
    assert len(saves) == 10  # 2 epochs x 4 steps, then the end of each epoch
    for a, b in zip(uninterrupted, saving, strict=True):
        assert torch.equal(a, b)
    assert_same_checkpoint(read_checkpoint(tmp_path / "a" / "checkpoint-last.pth"),
                           read_checkpoint(tmp_path / "d" / "checkpoint-last.pth"))

    no_flip = training_inputs(root, tmp_path / "c", monkeypatch, "--epochs", 2, "--no_hflip")
    assert flip_kinds(no_flip, images) == ["plain"] * 32


def test_online_eval_then_kill_and_resume_equals_uninterrupted_run(image_folder, tmp_path):
    """--online_eval after every epoch: a run killed after the evaluation of epoch 0 and resumed from the checkpoint
    written before that evaluation trains exactly like one that never stopped (losses to the printed 6 decimals,
    final weights, EMA tracks and AdamW state bit for bit): the evaluation's random draws are not the training's."""
    from test_resilience import assert_same_checkpoint, step_losses

    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})

    def cmd(out, *extra):
        return [sys.executable, "main_jit.py", *TINY, "--data_path", str(image_folder[0]), "--output_dir", str(out),
                "--batch_size", "4", "--num_workers", "0", "--epochs", "3", "--warmup_epochs", "1", "--blr", "1e-2",
                "--log_freq", "1", "--save_last_freq", "1", "--online_eval", "--eval_freq", "1", "--num_images", "2",
                "--gen_bsz", "2", "--num_sampling_steps", "2", "--sampling_method", "euler", "--cfg", "2.0",
                "--fid_stats", str(stats), *extra]

    reference = subprocess.run(cmd(tmp_path / "ref"), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert reference.returncode == 0, reference.stderr
    ref_log = reference.stdout + reference.stderr
    expected = step_losses(ref_log)
    assert len(expected) == 12 and ref_log.count("] FID ") == 3  # 3 epochs x 4 steps, an evaluation after each

    out = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd(out), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        start = time.time()
        while proc.poll() is None and "[epoch0_cfg2_ema1] FID" not in log_path.read_text() and time.time() - start < 600:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    killed_log = log_path.read_text()
    assert "[epoch0_cfg2_ema1] FID" in killed_log and "Epoch [1] [4/4]" not in killed_log
    resumed = subprocess.run(cmd(out, "--resume", out), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr
    resumed_log = resumed.stdout + resumed.stderr
    assert "continuing at epoch 1 step 0" in resumed_log
    losses = step_losses(killed_log)
    losses.update(step_losses(resumed_log))
    assert losses == expected
    assert_same_checkpoint(read_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"),
                           read_checkpoint(out / "checkpoint-last.pth"))


def test_a_run_reads_its_checkpoint_and_fid_stats_once(tmp_path, monkeypatch):
    """A run evaluating a --resume checkpoint twice (two EMA tracks) opens the checkpoint once (resume() checks and
    loads the one dict) and the --fid_stats file once (load_fid_stats reads it, every evaluation reuses it)."""
    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    checkpoint = tmp_path / "checkpoint-last.pth"
    args = main_jit.get_args_parser().parse_args(TINY)
    model = Denoiser(args)
    main_jit.save_checkpoint(checkpoint, model, misc.build_optimizer(model, 1e-4, 0.0, torch.device("cpu")), 0, args)
    opened = []
    torch_load, np_load = torch.load, np.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: opened.append(str(f)) or torch_load(f, *a, **k))
    monkeypatch.setattr(np, "load", lambda f, *a, **k: opened.append(str(f)) or np_load(f, *a, **k))
    run_main(["--evaluate_gen", "--resume", tmp_path, "--output_dir", tmp_path / "eval", "--sweep_ema", "1,2",
              "--fid_stats", stats, "--num_images", 2, "--gen_bsz", 2, "--num_sampling_steps", 1,
              "--sampling_method", "euler"], monkeypatch)
    assert opened.count(str(checkpoint)) == 1
    assert opened.count(str(stats)) == 1
    assert len(read_scalars(str(tmp_path / "eval"), "fid_cfg1_ema2")) == 1  # both evaluations ran


def test_gradients_are_freed_and_the_cache_emptied_around_evaluation(image_folder, tmp_path, monkeypatch):
    """No step's forward runs beside the last step's gradients (they are set to None first); validation,
    checkpoints and online evaluation run without them either, and sampling has torch.cuda.empty_cache() on either
    side, as the release."""
    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    events, model = [], []
    build = misc.build_optimizer

    def watched(denoiser, *args, **kwargs):
        model.append(denoiser)
        return build(denoiser, *args, **kwargs)

    def gradients(event):
        held = any(p.grad is not None for p in model[0].parameters())
        events.append(f"{event}, gradients {'held' if held else 'none'}")

    def forward(denoiser, *args, **kwargs):
        gradients("forward")
        return FORWARD(denoiser, *args, **kwargs)

    monkeypatch.setattr(misc, "build_optimizer", watched)
    monkeypatch.setattr(Denoiser, "forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(fid, "load_inception", lambda *args: None)
    monkeypatch.setattr(main_jit, "validate", lambda *args: gradients("validate"))
    monkeypatch.setattr(main_jit, "save_for_resume", lambda *args, **kwargs: gradients("save") or True)
    monkeypatch.setattr(main_jit, "evaluate_sweep", lambda *args: gradients("evaluate"))
    run_main(["--data_path", image_folder[0], "--output_dir", tmp_path, "--batch_size", 4, "--num_workers", 0,
              "--epochs", 2, "--val_fraction", 0.25, "--online_eval", "--eval_freq", 1, "--fid_stats", stats],
             monkeypatch)
    # 12 training images, batch 4: three steps per epoch
    epoch = ["forward, gradients none"] * 3 + ["validate, gradients none", "save, gradients none", "empty_cache",
                                               "evaluate, gradients none", "empty_cache"]
    assert events == epoch + epoch
