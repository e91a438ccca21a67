"""The validation loss (--val_path, --val_fraction): deterministic, independent of batch size and world size, the
training RNG untouched (exact resume), a disjoint and stable hold-out, printed and in TensorBoard, falling in a
short training run."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from denoiser import Denoiser
from engine_jit import validation_loss
from util.args import check_config, get_args_parser
from util.datasets import build_dataset, build_val_loader, build_val_set, setup_captions, shift_val_caption_ids
from util.digits import materialise_digits
from util.checkpoint import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32",
        "--num_workers", "0"]


def make_folder(root, seed, per_class=8):
    """<root>/train/{a,b}/*.png of different sizes, class b brighter than class a."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for i in range(per_class):
            pixels = rng.integers(0, 200, (34 + i, 38, 3)) + (50 if c == "b" else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return make_folder(root / "train_set", 1), make_folder(root / "val_set", 2, per_class=5)


def parse(*argv):
    args = get_args_parser().parse_args(TINY + list(map(str, argv)))
    args.rank, args.world_size = 0, 1  # what misc.init_distributed_mode sets in a single process
    return args


def tiny_model(args):
    """A seeded JiT-T/4 whose zero-initialised output layers are perturbed, so that the loss depends on the weights."""
    torch.manual_seed(0)
    model = Denoiser(args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def val_loss_of(folder, batch_size):
    args = parse("--data_path", folder, "--batch_size", batch_size)
    loader = build_val_loader(args, build_dataset(args, False).samples)
    return validation_loss(tiny_model(args), loader, torch.device("cpu"), args)


def test_deterministic_batch_size_free_and_leaves_the_training_rng_alone(folders):
    _, val_folder = folders
    args = parse("--data_path", val_folder, "--batch_size", 4, "--label_drop_prob", 0.5)
    loader = build_val_loader(args, build_dataset(args, False).samples)
    model = tiny_model(args).train()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    first, count = validation_loss(model, loader, torch.device("cpu"), args)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the training RNG: exact resume is unaffected
    assert model.training  # the training mode comes back
    second, _ = validation_loss(model, loader, torch.device("cpu"), args)
    assert count == 10 and np.isfinite(first)
    assert abs(first - second) <= 1e-6 * first
    # each sample's draws depend on its index only, not on the batch it falls in
    assert val_loss_of(val_folder, 3)[0] == pytest.approx(val_loss_of(val_folder, 7)[0], rel=1e-6)
    # the label drop is part of the fixed draws: another drop probability gives another value
    no_drop = parse("--data_path", val_folder, "--batch_size", 4, "--label_drop_prob", 0.0)
    assert validation_loss(tiny_model(no_drop), loader, torch.device("cpu"), no_drop)[0] != first
    with torch.no_grad():  # other weights, other value
        model.net.final_layer.linear.weight.mul_(1.5)
    assert abs(validation_loss(model, loader, torch.device("cpu"), args)[0] - first) > 1e-3


def test_two_ranks_give_the_value_of_one_process(folders, tmp_path):
    _, val_folder = folders
    out = tmp_path / "val.pt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/ddp_val.py", str(val_folder), str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    two_ranks = torch.load(out)
    one = val_loss_of(val_folder, 3)
    assert two_ranks["count"] == one[1] == 10  # 5 + 5 images, none padded or duplicated
    assert two_ranks["rank_counts"] == [5, 5]
    assert two_ranks["loss"] == pytest.approx(one[0], rel=1e-6)


def test_val_fraction_holds_out_a_disjoint_stable_set(folders, tmp_path):
    train_folder, _ = folders
    args = parse("--data_path", train_folder, "--val_fraction", 0.25)
    dataset = build_dataset(args, False)
    everything = list(dataset.samples)
    torch.manual_seed(123)  # neither the RNG state nor --seed choose the split
    held_out, _ = build_val_set(args, dataset, False)
    assert len(held_out) == 4 and len(dataset.samples) == 12
    assert not set(held_out) & set(dataset.samples) and sorted(held_out + dataset.samples) == sorted(everything)
    assert {label for _, label in held_out} == {0, 1}  # this split happens to hold out both classes

    def split(folder, *extra):
        a = parse("--data_path", folder, "--val_fraction", 0.25, *extra)
        d = build_dataset(a, False)
        held, _ = build_val_set(a, d, False)
        return [os.path.relpath(p, folder) for p, _ in held], [os.path.relpath(p, folder) for p, _ in d.samples]

    torch.manual_seed(7)
    same = split(train_folder, "--seed", 9)
    moved = shutil.copytree(train_folder, tmp_path / "elsewhere")  # another mount point, the same split
    assert same == split(moved) == ([os.path.relpath(p, train_folder) for p, _ in held_out],
                                    [os.path.relpath(p, train_folder) for p, _ in dataset.samples])

    with pytest.raises(SystemExit, match=r"^--val_fraction 0.01: holds out none of the 16 training images$"):
        build_val_set(parse("--data_path", train_folder, "--val_fraction", 0.01), build_dataset(args, False), False)
    with pytest.raises(SystemExit, match=r"^--val_fraction 1.0: must be at least 0 and below 1$"):
        check_config(parse("--val_fraction", 1.0, "--output_dir", tmp_path))
    with pytest.raises(SystemExit, match=r"^--val_path x and --val_fraction 0.1: give one of the two$"):
        check_config(parse("--val_path", "x", "--val_fraction", 0.1, "--output_dir", tmp_path))
    with pytest.raises(SystemExit, match=r"^--val_path .*missing: no train/ folder"):
        build_val_set(parse("--val_path", tmp_path / "missing"), None, False)


def captioned_folder(root, captions):
    os.makedirs(root / "images")
    os.makedirs(root / "captions")
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(root / "images" / f"{i}.png")
        (root / "captions" / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def test_captioned_val_path_keeps_its_captions(tiny_llm_path, tmp_path):
    """A -Text model's --val_path has captions of its own: appended to the model's caption list after the training
    captions, each validation image is labelled with its own caption."""
    train = captioned_folder(tmp_path / "train", ["犬の写真", "猫の写真", "犬の写真"])
    val = captioned_folder(tmp_path / "val", ["a photo of a cat", "猫の写真", "赤いりんごの写真"])
    args = get_args_parser().parse_args(["--model", "JiT-T/4-Text", "--img_size", "32", "--device", "cpu",
                                         "--llm_model_name", tiny_llm_path, "--data_path", str(train),
                                         "--val_path", str(val), "--text_cache_dir", str(tmp_path / "cache")])
    model = Denoiser(args)
    dataset = build_dataset(args, True)
    samples, captions = build_val_set(args, dataset, True)
    setup_captions(args, model, dataset, captions)
    samples = shift_val_caption_ids(model, samples, captions)
    by_image = {os.path.basename(path): model.net.y_embedder.captions[label] for path, label in samples}
    assert by_image == {"0.png": "a photo of a cat", "1.png": "猫の写真", "2.png": "赤いりんごの写真"}
    assert len(model.net.y_embedder._locations) == len(model.net.y_embedder.captions) == 5  # all in the store


def train_cmd(data, out, *extra):
    return [sys.executable, "main_jit.py", *TINY, "--data_path", str(data), "--output_dir", str(out),
            "--batch_size", "4", "--warmup_epochs", "1", "--blr", "1e-2", "--log_freq", "1", *map(str, extra)]


def run(cmd):
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def logged(log, what):
    """['Epoch [e] [s/n] loss x' or 'Epoch [e] val_loss x'] of the log lines holding `what` (' loss ' or 'val_loss'):
    timestamps and timings cut off."""
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if what in line and "Epoch [" in line]
    return [" ".join(line.split()[:line.split().index(what.strip()) + 2]) for line in lines]


@pytest.mark.slow
def test_training_rng_and_resume_unaffected(folders, tmp_path):
    """The same run with and without --val_path logs the same training losses and ends with the same weights;
    stopped after one epoch and resumed, it logs the same validation losses and ends the same."""
    train_folder, val_folder = folders
    with_val = run(train_cmd(train_folder, tmp_path / "val", "--epochs", 2, "--val_path", val_folder))
    without = run(train_cmd(train_folder, tmp_path / "plain", "--epochs", 2))
    assert len(logged(with_val, "val_loss")) == 2 and not logged(without, "val_loss")
    assert logged(with_val, " loss ") == logged(without, " loss ") and len(logged(without, " loss ")) == 8
    run(train_cmd(train_folder, tmp_path / "resumed", "--epochs", 1, "--val_path", val_folder))
    resumed = run(train_cmd(train_folder, tmp_path / "resumed", "--epochs", 2, "--val_path", val_folder,
                            "--resume", tmp_path / "resumed"))
    assert logged(resumed, "val_loss") == logged(with_val, "val_loss")[1:]
    final = {name: read_checkpoint(tmp_path / name / "checkpoint-last.pth") for name in ("val", "plain", "resumed")}
    for name in ("plain", "resumed"):
        for key in ("model", "model_ema1", "model_ema2"):
            assert all(torch.equal(v, final[name][key][k]) for k, v in final["val"][key].items()), (name, key)


@pytest.mark.slow
def test_falls_in_a_short_training_run_printed_and_in_tensorboard(tmp_path):
    """JiT-T/4 on 200 scikit-learn digits, 40 held out: 3 epochs of 10 steps (fp32)."""
    folder, _, _, _ = materialise_digits(str(tmp_path / "digits"), per_class=20)
    out = tmp_path / "out"
    log = run([sys.executable, "main_jit.py", "--model", "JiT-T/4", "--img_size", "32", "--class_num", "10",
               "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--data_path", folder,
               "--output_dir", out, "--batch_size", "16", "--epochs", "3", "--warmup_epochs", "1", "--lr", "1e-3",
               "--log_freq", "5", "--no_hflip", "--val_fraction", "0.2"])
    assert "160 training images" in log and "40 validation images" in log
    printed = [float(line.split("val_loss ")[1].split()[0]) for line in logged(log, "val_loss")]
    assert [line.split(" val_loss")[0] for line in logged(log, "val_loss")] == ["Epoch [0]", "Epoch [1]", "Epoch [2]"]
    events = [name for name in os.listdir(out) if name.startswith("events.out.tfevents")]
    acc = EventAccumulator(str(out / events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    val = [(e.step, e.value) for e in acc.Scalars("val_loss")]
    train = [(e.step, e.value) for e in acc.Scalars("train_loss")]
    assert [step for step, _ in val] == [10, 20, 30]  # at the end of each epoch, on train_loss's step axis
    assert [step for step, _ in train] == [5, 10, 15, 20, 25, 30]
    assert [value for _, value in val] == pytest.approx(printed, abs=1e-6)
    assert printed[0] > printed[1] > printed[2] and printed[2] < 0.6 * printed[0]
