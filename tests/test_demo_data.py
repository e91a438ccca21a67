"""demo.py: the scikit-learn digits as an ImageFolder and as images/ + captions/, and `demo.py --quick` end to end."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets

import demo
from text_image_dataset import TextImageDataset
from util.digits import materialise_digits
from util.stages import read_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    folder_root, captioned_root, count, written = materialise_digits(str(out))
    assert written and count == 1797
    return out


def test_imagefolder_counts_per_class(digits_dir):
    expected = np.bincount(load_digits().target, minlength=10)
    train = digits_dir / "digits" / "train"
    assert sorted(os.listdir(train)) == [str(d) for d in range(10)]
    counts = [len(os.listdir(train / str(d))) for d in range(10)]
    assert counts == expected.tolist() and sum(counts) == 1797
    dataset = datasets.ImageFolder(str(train))
    assert dataset.classes == [str(d) for d in range(10)]  # class index == digit


def test_images_are_32px_rgb_digits(digits_dir):
    digits = load_digits()
    index = int(np.flatnonzero(digits.target == 0)[0])
    image = Image.open(digits_dir / "digits" / "train" / "0" / f"digit_{index:04d}.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    # dark ink on white paper: a zero is a ring, so the centre and the corners are bright, the ring dark
    assert pixels[0, 0, 0] > 200 and pixels.min() < 60
    small = np.asarray(image.convert("L").resize((8, 8), Image.BOX)).astype(float)
    ink = 255 - small
    assert np.corrcoef(ink.ravel(), digits.images[index].ravel())[0, 1] > 0.9


def test_captioned_layout_with_japanese_and_english(digits_dir):
    root = digits_dir / "digits_captioned"
    images = sorted(os.listdir(root / "images"))
    captions = sorted(os.listdir(root / "captions"))
    assert len(images) == len(captions) == 1797
    assert [os.path.splitext(n)[0] for n in images] == [os.path.splitext(n)[0] for n in captions]
    target = load_digits().target
    texts = {}
    for name in captions:
        text = (root / "captions" / name).read_text(encoding="utf-8")
        index = int(re.fullmatch(r"digit_(\d{4})\.txt", name).group(1))
        assert text.endswith("\n") and text.count("\n") == 1
        texts[index] = text.strip()
        assert texts[index] in (f"手書きの数字{target[index]}", f"a handwritten digit {target[index]}")
    assert texts[0] == "手書きの数字0" and texts[1] == "a handwritten digit 1"
    japanese = sum(t.startswith("手書き") for t in texts.values())
    assert japanese == 899  # every even index
    dataset = TextImageDataset(str(root))  # the layout main_jit.py trains -Text models on
    assert len(dataset.samples) == 1797 and len(dataset.captions) == 20


def test_materialisation_is_idempotent_and_subsets(digits_dir, tmp_path):
    marker = digits_dir / "digits" / ".complete"
    before = os.path.getmtime(digits_dir / "digits" / "train" / "5" / "digit_0005.png")
    assert materialise_digits(str(digits_dir))[3] is False
    assert os.path.getmtime(digits_dir / "digits" / "train" / "5" / "digit_0005.png") == before
    assert marker.read_text() == "1797 images\n"
    _, _, count, written = materialise_digits(str(tmp_path), per_class=3)
    assert written and count == 30
    assert all(len(os.listdir(tmp_path / "digits" / "train" / str(d))) == 3 for d in range(10))


def test_loss_curve_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    for step, loss in [(7, 1.9), (14, 1.2), (21, 0.8), (28, 0.6)]:
        writer.add_scalar("train_loss", loss, step)
    writer.close()
    points = read_scalars(str(tmp_path))
    assert [s for s, _ in points] == [7, 14, 21, 28] and abs(points[-1][1] - 0.6) < 1e-6
    demo.plot_loss(points, str(tmp_path / "loss.png"), 28)
    image = Image.open(tmp_path / "loss.png")
    assert image.size[0] >= 320 and image.size[1] >= 200


def test_demo_reads_the_evaluation_record_and_grids_its_pngs(make_args, tmp_path, monkeypatch):
    """demo.py reads the FID, grid and PNG folder of an evaluation from the line engine_jit.evaluate appends to
    evaluations.jsonl (never from printed text), and its digit grid is util/images.save_grid's: one row per digit,
    nrow images each (2 px padding, as make_grid)."""
    import argparse

    import torch

    import engine_jit
    from denoiser import Denoiser
    from util import fid

    monkeypatch.setattr(fid, "inception_features", lambda net, images: (torch.randn(len(images), 2048), None))
    monkeypatch.setattr(fid, "fid_from_stats", lambda stats1, stats2: 215.61234)  # skip a 2048-d eigvals
    args = make_args("--output_dir", str(tmp_path), "--num_images", "20", "--gen_bsz", "8", "--save_png",
                     "--num_sampling_steps", "1", "--sampling_method", "euler", "--cfg", "1.5", "--eval_ema", "2")
    model = Denoiser(args)
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    for epoch in (3, 15):
        engine_jit.evaluate(model, args, epoch, None, torch.device("cpu"), argparse.Namespace(source="stub"), stats,
                            list(range(10)))
    record = demo.last_evaluation(str(tmp_path))
    png_dir = str(tmp_path / "images_epoch15_cfg1.5_ema2")
    assert record == {"epoch": 15, "cfg": 1.5, "ema": 2, "num_images": 20, "fid": 215.61234, "inception_score": None,
                      "inception_source": "stub", "grid": str(tmp_path / "samples_epoch15_cfg1.5_ema2.png"),
                      "images": png_dir}
    assert len(engine_jit.read_evaluations(str(tmp_path))) == 2 and os.path.isfile(record["grid"])
    assert sorted(os.listdir(png_dir))[:3] == ["000000_class0.png", "000001_class1.png", "000002_class2.png"]
    with pytest.raises(SystemExit, match="no evaluation recorded in"):
        demo.last_evaluation(str(tmp_path / "nothing"))

    for n in range(20):  # 2 per digit, gray level = digit * 20
        image = Image.fromarray(np.full((8, 8, 3), (n % 10) * 20, np.uint8))
        image.save(os.path.join(png_dir, f"{n:06d}_class{n % 10}.png"))
    demo.digit_grid(png_dir, str(tmp_path / "grid.png"), 2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (10 * 10 + 2, 2 * 10 + 2, 3)
    assert [int(grid[2 + 10 * d, 2, 0]) for d in range(10)] == [20 * d for d in range(10)]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """`demo.py --quick` shows training work: the FID drops well below the untrained model's flat gray (measured
    here: see the README), the validation loss is printed every epoch and logged; a rerun starts fresh."""
    out = tmp_path / "quick"
    result = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out), "--device", "cpu"], cwd=REPO,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout
    untrained = re.search(r"untrained \(initial weights\)\s+FID\s+([0-9.]+)", log)
    trained = re.search(r"trained \(8 epochs, EMA 0.95\)\s+FID\s+([0-9.]+)", log)
    assert untrained and trained, log[-3000:]
    assert float(trained.group(1)) < 0.75 * float(untrained.group(1)), (untrained.group(1), trained.group(1))
    for name in ("digits_grid.png", "loss_curve.png", "train/checkpoint-last.pth", "fid_stats/digits16_40.npz"):
        assert (out / name).is_file(), name
        assert str(out / name) in log
    assert len(re.findall(r"Epoch \[\d\] val_loss [0-9.]+ \(50 validation images", log)) == 8
    val = read_scalars(str(out / "train"), "val_loss")
    assert len(val) == 8 and val[-1][1] < val[0][1], val
    assert "validation loss (50 held-out digits" in log
    assert Image.open(out / "digits_grid.png").size == (2 * 18 + 2, 10 * 18 + 2)  # one row per digit, 16 px
    assert "stage timings:" in log
    assert "starts fresh" not in log and "note: resumed" not in log

    # a rerun trains again from scratch instead of resuming the finished checkpoint and calling it "trained"
    rerun = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out), "--device", "cpu", "--epochs",
                            "1", "--fid_images", "10"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"--quick starts fresh: removed the previous run {out / 'train'}" in rerun.stdout
    assert "note: resumed" not in rerun.stdout and "training epochs 0..0" in rerun.stdout
    assert len(read_scalars(str(out / "train"), "val_loss")) == 1


def test_full_demo_rerun_says_it_resumed(make_args, tmp_path):
    """The full demo resumes <out>/train: the report says so, from the checkpoint it found before training, and that
    a finished run trained no new steps."""
    import torch

    from denoiser import Denoiser
    from util.checkpoint import save_checkpoint

    path = str(tmp_path / "checkpoint-last.pth")
    assert demo.checkpoint_epochs(path) is None
    assert demo.resume_note(None, 16, "demo_output/train") is None
    args = make_args()
    model = Denoiser(args)
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), 15, args, {"epoch": 16, "step": 0, "rng": []})
    assert demo.checkpoint_epochs(path) == (15, 16)
    assert "resumed a finished run (demo_output/train, epoch 15): no new training steps" in demo.resume_note(
        demo.checkpoint_epochs(path), 16, "demo_output/train")
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), 5, args, {"epoch": 6, "step": 0, "rng": []})
    assert demo.resume_note(demo.checkpoint_epochs(path), 16, "demo_output/train").startswith(
        "note: resumed demo_output/train at epoch 6")


def test_demo_stages_run_offline_and_outside_slurm(tmp_path, monkeypatch):
    """The demos' commands get stages.tool_env, as gpu_check's: inside an sbatch script a stage's main_jit.py must not
    take itself for one of the job's srun tasks."""
    import argparse

    from util import stages

    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    _, _, env = stages.start(argparse.Namespace(device="cpu", precision="fp32"), str(tmp_path / "out"))
    assert not [name for name in env if name.startswith("SLURM_")]
    assert env["JIT_OFFLINE"] == env["HF_HUB_OFFLINE"] == "1"
