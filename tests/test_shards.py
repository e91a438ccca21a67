"""Pre-cropped shards (prepare_data.py, util/shards.py): the same batches as the ImageFolder path, resumable
preparation, training and exact resume from shards, and FID reference statistics from them."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
import prepare_ref
from util.args import get_args_parser
from util.datasets import build_dataset, build_train_loader
from util import fid
from util.data import load_rgb, train_transform
from util.preemption import PREEMPTED_EXIT_CODE
from util.shards import ShardDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """<root>/train/{a,b,c}: 7 images per class (JPEG and PNG, RGB and grayscale, sizes around and above 2 x 32,
    so the crop halves, resizes and crops)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate("abc"):
        os.makedirs(root / "train" / name)
        for i in range(7):
            h, w = 30 + 9 * i, 70 - 3 * i
            pixels = (rng.integers(0, 150, (h, w, 3)) + 50 * c).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i % 3 == 1:
                image.convert("L").save(root / "train" / name / f"{i}.png")
            else:
                image.save(root / "train" / name / f"{i}.jpg", quality=90)
    return root


def prepare(data, out, *extra):
    prepare_data.main(prepare_data.get_args_parser().parse_args(
        ["--data_path", str(data), "--out", str(out), "--img_size", "32", "--num_workers", "0", *map(str, extra)]))


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    prepare(image_folder, out, "--shard_size", "8")  # 21 images: shards of 8, 8 and 5
    return out


def loader_args(data, *extra, rank=0, world_size=1):
    args = get_args_parser().parse_args(TINY + ["--data_path", str(data), "--batch_size", "4", *extra])
    args.rank, args.world_size = rank, world_size
    return args


def batches(args, epoch, start_step=0):
    loader = build_train_loader(args, build_dataset(args, text=False))
    loader.sampler.set_epoch(epoch, start_index=start_step * args.batch_size)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_shards_hold_the_training_crops_in_imagefolder_order(image_folder, shards):
    dataset = ShardDataset(str(shards))
    index = json.loads((shards / "jit_shards.json").read_text())
    assert [s["count"] for s in index["shards"]] == [8, 8, 5] and dataset.classes == ["a", "b", "c"]
    folder = build_dataset(loader_args(image_folder), text=False)
    transform = train_transform(32)
    assert len(dataset) == len(folder.samples) == 21
    for i, (path, label) in enumerate(folder.samples):
        image, shard_label = dataset[i]
        assert shard_label == label
        assert image.dtype == torch.uint8 and torch.equal(image, transform(load_rgb(path)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_batches_equal_imagefolder_batches(image_folder, shards, num_workers):
    for rank, world_size in [(0, 1), (1, 2)]:  # a single process, and the second of two DDP ranks
        for epoch, start_step in [(0, 0), (3, 1)]:  # a whole epoch, and an epoch resumed mid-way
            extra = ["--num_workers", str(num_workers)]
            jpeg = batches(loader_args(image_folder, *extra, rank=rank, world_size=world_size), epoch, start_step)
            shard = batches(loader_args(shards, *extra, rank=rank, world_size=world_size), epoch, start_step)
            assert len(jpeg) == len(shard) == 21 // world_size // 4 - start_step
            for (x1, y1), (x2, y2) in zip(jpeg, shard):
                assert x1.dtype == x2.dtype == torch.uint8
                assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_preparation_resumes_and_handles_bad_images(image_folder, shards, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in ("shard-00000.npy", "shard-00001.npy")}
    os.remove(out / "shard-00002.json")  # as if killed while writing the last shard
    os.remove(out / "jit_shards.json")
    capsys.readouterr()
    prepare(image_folder, out, "--shard_size", "8")
    assert "(2 already written)" in capsys.readouterr().out
    assert {name: os.stat(out / name).st_mtime_ns for name in stamps} == stamps  # completed shards kept
    assert (np.load(out / "shard-00002.npy") == np.load(shards / "shard-00002.npy")).all()
    assert len(ShardDataset(str(out))) == 21

    with pytest.raises(SystemExit, match=r"holds shards of another job \(different shard_size\); use another --out"):
        prepare(image_folder, out, "--shard_size", "5")

    bad = tmp_path / "bad"
    os.makedirs(bad / "train" / "a")
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(bad / "train" / "a" / f"{i}.png")
    (bad / "train" / "a" / "1.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match=r"^prepare_data.py: .*1.png: unreadable image .*--on_bad_data skip$"):
        prepare(bad, tmp_path / "bad_error")
    with pytest.warns(UserWarning, match="1.png: unreadable image"):
        prepare(bad, tmp_path / "bad_skip", "--on_bad_data", "skip")
    dataset = ShardDataset(str(tmp_path / "bad_skip"))
    assert len(dataset) == 2 and int(dataset[1][0].float().mean()) == 120  # 0.png and 2.png


def test_shards_refuse_another_img_size_and_text_models(shards):
    with pytest.raises(SystemExit, match="^--data_path .* holds 32 px crops, not the --img_size 64 asked for"):
        build_dataset(get_args_parser().parse_args(TINY[:2] + ["--img_size", "64", "--data_path", str(shards)]),
                      text=False)
    with pytest.raises(SystemExit, match="shards hold class labels only"):
        build_dataset(loader_args(shards), text=True)
    with pytest.raises(SystemExit, match=r"^--class_num 2: .* has 3 class folders, so labels would reach 2"):
        build_dataset(loader_args(shards, "--class_num", "2"), text=False)
    with pytest.raises(SystemExit, match="^prepare_ref.py: error: --data_path .* holds 32 px crops, not the "
                                         "--img_size 64"):
        prepare_ref.shard_images(prepare_ref.get_args_parser().parse_args(
            ["--data_path", str(shards), "--img_size", "64", "--stats_out", "x.npz"]))


def train(data, out, *extra):
    cmd = [sys.executable, "main_jit.py", *TINY, "--precision", "fp32", "--data_path", str(data),
           "--output_dir", str(out), "--resume", str(out), "--batch_size", "4", "--num_workers", "0", "--epochs", "2",
           "--warmup_epochs", "1", "--blr", "1e-2", "--log_freq", "1", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def losses(log):
    return [line.split("] loss ")[1].split()[0] for line in log.splitlines() if "] loss " in line]


@pytest.mark.slow
def test_training_from_shards_equals_imagefolder_and_resumes_exactly(image_folder, shards, tmp_path):
    runs = {}
    for name, data in (("jpeg", image_folder), ("shards", shards)):
        proc = train(data, tmp_path / name)
        runs[name] = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, runs[name]
    assert "pre-cropped shards" in runs["shards"] and "lr " in runs["shards"]
    assert len(losses(runs["jpeg"])) == 10 and losses(runs["jpeg"]) == losses(runs["shards"])  # same flips too

    resumed = tmp_path / "resumed"
    proc = train(shards, resumed)
    log = ""
    for line in proc.stdout:  # preempt mid-epoch 0, as SLURM does
        log += line
        if "Epoch [0] [2/5]" in line:
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE, log
    proc = train(shards, resumed)
    log2 = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log2
    assert "continuing at epoch 0 step" in log2
    assert losses(log) + losses(log2) == losses(runs["shards"])
    final = torch.load(resumed / "checkpoint-last.pth", map_location="cpu", weights_only=False)["model"]
    expected = torch.load(tmp_path / "shards" / "checkpoint-last.pth", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_reference_statistics_from_shards_equal_imagefolder(image_folder, shards, tmp_path):
    weights = fid.convert_fid_helper_weights(str(tmp_path / "cache"))
    stats = {}
    for name, data in (("jpeg", image_folder), ("shards", shards)):
        out = tmp_path / f"{name}.npz"
        result = subprocess.run([sys.executable, "prepare_ref.py", "--data_path", str(data), "--img_size", "32",
                                 "--stats_out", str(out), "--num_workers", "0", "--inception_weights", weights,
                                 "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        stats[name] = fid.load_stats(str(out))
    assert "pre-cropped 32 px images" in result.stdout
    np.testing.assert_allclose(stats["shards"]["mu"], stats["jpeg"]["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["shards"]["sigma"], stats["jpeg"]["sigma"], rtol=1e-4, atol=1e-6)
