"""Training pipeline: torchrun with 2 CPU ranks (gloo), checkpoints, resume, evaluation, DDP averaging."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import engine_jit
import util.misc as misc
from denoiser import Denoiser
from util.args import get_args_parser
from util.datasets import build_dataset
from util.checkpoint import read_checkpoint, resolve_checkpoint_path
from util.images import to_uint8
from util.lr_sched import learning_rate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]


def tiny_args(*extra):
    return get_args_parser().parse_args(TINY + list(extra))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """<root>/train/{a,b}/*.png: 8 images per class, of different sizes, class b brighter than class a."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        os.makedirs(root / "train" / name)
        for i in range(8):
            h, w = 36 + i, 40 + 2 * i
            pixels = rng.integers(0, 128, (h, w, 3)) + 100 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / "train" / name / f"{i}.png")
    return root


def run(cmd, **kwargs):
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result.stdout + result.stderr


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "main_jit.py", *TINY, *map(str, args)]


@pytest.mark.slow
def test_torchrun_train_resume_evaluate(image_folder, tmp_path):
    out = tmp_path / "out"
    common = ["--data_path", image_folder, "--output_dir", out, "--batch_size", 4, "--num_workers", 1,
              "--warmup_epochs", 1, "--log_freq", 1, "--blr", 1e-3]
    log = run(torchrun(*common, "--epochs", 2, "--save_last_freq", 1))
    assert "Epoch [1] [2/2]" in log  # 16 images / (2 ranks x 4) = 2 steps per epoch
    ckpt = read_checkpoint(out / "checkpoint-last.pth")
    # the official keys, plus resume_state beside them (ignored by the original code)
    assert set(ckpt) == {"model", "model_ema1", "model_ema2", "optimizer", "epoch", "args", "resume_state"}
    assert ckpt["resume_state"]["epoch"] == 2 and ckpt["resume_state"]["step"] == 0
    assert len(ckpt["resume_state"]["rng"]) == 2  # both ranks' RNG states
    assert ckpt["epoch"] == 1
    expected_keys = list(Denoiser(tiny_args()).state_dict())
    for key in ("model", "model_ema1", "model_ema2"):
        assert list(ckpt[key]) == expected_keys
    assert not torch.equal(ckpt["model"]["net.final_layer.linear.weight"],
                           ckpt["model_ema1"]["net.final_layer.linear.weight"])
    steps = [s["step"].item() for s in ckpt["optimizer"]["state"].values()]
    assert set(steps) == {4.0}
    # default lr = blr * batch_size * world_size / 256, and past the 1-epoch warm-up it is what AdamW stepped with
    assert ckpt["args"].lr == 1e-3 * 4 * 2 / 256 and "lr 3.13e-05 (blr 1.00e-03, effective batch 8)" in log
    assert {group["lr"] for group in ckpt["optimizer"]["param_groups"]} == {1e-3 * 4 * 2 / 256}

    log = run(torchrun(*common, "--epochs", 3, "--resume", out))
    assert "continuing at epoch 2 step 0" in log and "Epoch [2] [2/2]" in log and "Epoch [1]" not in log
    resumed = read_checkpoint(out / "checkpoint-last.pth")
    assert resumed["epoch"] == 2
    # the optimizer state came back: Adam's step counter continues from 4 instead of restarting at 0
    assert {s["step"].item() for s in resumed["optimizer"]["state"].values()} == {6.0}

    from util import fid
    stats = tmp_path / "stats.npz"
    reals = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)))
                                       for p in sorted((image_folder / "train").rglob("*.png"))]))
    inception = fid.load_inception(None, torch.device("cpu"))
    pool, _ = fid.inception_features(inception, reals.permute(0, 3, 1, 2).contiguous())
    fid.save_stats(stats, fid.features_to_stats(pool))
    log = run(torchrun("--evaluate_gen", "--resume", out, "--output_dir", out, "--num_images", 6, "--gen_bsz", 2,
                       "--num_sampling_steps", 3, "--cfg", 2.0, "--fid_stats", stats, "--sweep_ema", "1,2",
                       "--save_png"))
    fids = [line for line in log.splitlines() if "FID" in line and "Inception" in line]
    assert len(fids) == 2, log
    for line, ema in zip(fids, (1, 2)):
        # rank 0 gathered all 6 images (3 per rank, in batches of 2 and 1), 3 per class, each saved once
        assert f"[epoch2_cfg2_ema{ema}] FID " in line and "(6 images," in line, line
        png_dir = out / f"images_epoch2_cfg2_ema{ema}"
        names = sorted(os.listdir(png_dir))
        assert names == [f"{i:06d}_class{i % 2}.png" for i in range(6)]
        images = torch.stack([torch.from_numpy(np.array(Image.open(png_dir / n))).permute(2, 0, 1) for n in names])
        # the FID of the gathered in-memory features equals one computed here from the saved PNGs
        pool, _ = fid.inception_features(inception, images)
        expected = fid.fid_from_stats(fid.features_to_stats(pool), fid.load_stats(stats))
        assert float(line.split("FID ")[1].split()[0]) == pytest.approx(expected, rel=1e-3, abs=1e-3)
        # the grid shows rank 0's share (global indices 0, 2, 4), cell for cell (make_grid padding 2, 8 columns)
        grid = np.asarray(Image.open(out / f"samples_epoch2_cfg2_ema{ema}.png"))
        assert grid.shape == (2 + 34, 2 + 3 * 34, 3)
        for cell, index in enumerate((0, 2, 4)):
            assert np.array_equal(grid[2:34, 2 + 34 * cell:34 + 34 * cell], images[index].permute(1, 2, 0).numpy())
    ema1, ema2 = (np.asarray(Image.open(out / f"images_epoch2_cfg2_ema{e}" / "000001_class1.png")) for e in (1, 2))
    assert not np.array_equal(ema1, ema2)  # the sweep did switch tracks


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    t = torch.rand(8, generator=g)
    noise = torch.randn(8, 3, 32, 32, generator=g)
    return x, labels, t, noise


def one_step_model():
    torch.manual_seed(0)
    model = Denoiser(tiny_args("--label_drop_prob", "0"))
    with torch.no_grad():  # leave the zero init so that every parameter gets a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.ema_params = [[p.detach().clone() for p in model.parameters()] for _ in range(2)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.slow
def test_ema_tracks_identical_across_ranks_from_scratch(tmp_path):
    """Each rank builds its EMA tracks from its own seed; after main_jit's DDP set-up they must all be rank 0's."""
    out = tmp_path / "ema"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/ddp_ema.py", out])
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    for when in ("start", "steps"):
        (live0, tracks0), (live1, tracks1) = ranks[0][when], ranks[1][when]
        for key in live0:
            assert torch.equal(live0[key], live1[key]), (when, key)
        for track in range(2):
            for t0, t1 in zip(tracks0[track], tracks1[track], strict=True):
                assert torch.equal(t0, t1), (when, track)
    # at start-up the tracks are copies of the (broadcast) live weights; after the steps they have moved
    live0, tracks0 = ranks[0]["start"]
    assert all(torch.equal(p, t) for p, t in zip(live0.values(), tracks0[0], strict=True))
    assert not torch.equal(ranks[0]["steps"][1][0][-1], ranks[0]["start"][1][0][-1])


@pytest.mark.slow
def test_main_on_two_ranks_ends_with_rank_0s_ema_tracks_on_every_rank(image_folder, tmp_path):
    """main_jit.py itself on 2 gloo ranks, compiled as on a GPU (--compile, traced by dynamo): each rank built its
    EMA tracks from its own seed (seed + rank); main's DDP set-up gives them rank 0's, so after training every rank
    holds the same weights and EMA tracks, those of rank 0's checkpoint. DDP keeps one copy of the gradients (views of
    its buckets) and broadcasts no buffers."""
    out = tmp_path / "out"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/ddp_main.py",
         *map(str, [tmp_path / "ranks", *TINY, "--data_path", image_folder, "--output_dir", out, "--batch_size", 4,
                    "--num_workers", 0, "--epochs", 1, "--warmup_epochs", 1, "--blr", 1e-2, "--ema_decay1", 0.9,
                    "--ema_decay2", 0.5, "--compile"])])
    ranks = [torch.load(f"{tmp_path / 'ranks'}.rank{r}") for r in range(2)]
    checkpoint = read_checkpoint(out / "checkpoint-last.pth")
    names = list(ranks[0]["model"])
    assert checkpoint["resume_state"]["step"] == 0 and checkpoint["epoch"] == 0  # the epoch's 2 steps were taken
    for rank in ranks:
        assert rank["ddp"] == {"gradient_as_bucket_view": True, "forward_sync_buffers": False}
        assert rank["compiled"] == [f"net.blocks.{i}" for i in range(6)] + ["net.final_layer"]
        for key in names:
            assert torch.equal(rank["model"][key], checkpoint["model"][key]), key
        parameters = [name for name in names if name in checkpoint["model_ema1"]]
        for track in (1, 2):
            for name, tensor in zip(parameters, rank["ema"][track - 1], strict=True):
                assert torch.equal(tensor, checkpoint[f"model_ema{track}"][name]), (track, name)
    bias = parameters.index("net.final_layer.linear.bias")  # zero at init, moved by the second step
    assert not torch.equal(ranks[0]["ema"][0][bias], ranks[0]["ema"][1][bias])


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "ddp.pth"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tests/ddp_step.py", out])
    model, optimizer = one_step_model()
    x, labels, t, noise = fixed_batch()
    model(x, labels, t=t, noise=noise).backward()
    optimizer.step()
    model.update_ema()
    ddp = torch.load(out)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert list(ddp["grads"]) == list(grads) and len(grads) == len(list(model.parameters())) - 1  # all but pos_embed
    for key, value in grads.items():
        torch.testing.assert_close(ddp["grads"][key], value, rtol=1e-4, atol=1e-7, msg=key)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in model.ema_state_dict(1).items():
        torch.testing.assert_close(ddp["ema1"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    # the step did change the weights, so the comparison is not vacuous
    before, _ = one_step_model()
    assert not torch.equal(before.state_dict()["net.blocks.0.attn.qkv.weight"],
                           model.state_dict()["net.blocks.0.attn.qkv.weight"])


def test_learning_rate_schedule():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=5, epochs=15, lr_schedule="constant")
    assert learning_rate(0, args) == 0.0
    assert learning_rate(2.5, args) == 0.5
    assert learning_rate(5, args) == 1.0 and learning_rate(14.9, args) == 1.0
    args.lr_schedule = "cosine"
    assert learning_rate(5, args) == pytest.approx(1.0)
    assert learning_rate(10, args) == pytest.approx(0.55)
    assert learning_rate(15, args) == pytest.approx(0.1)


def test_eval_labels_split_exactly_and_class_balanced():
    per_rank = [engine_jit.eval_labels(30, range(3), r, 4) for r in range(4)]
    assert sum(len(p) for p in per_rank) == 30
    assert torch.bincount(torch.cat(per_rank)).tolist() == [10, 10, 10]
    assert engine_jit.eval_labels(5, [7, 9], 0, 1).tolist() == [7, 9, 7, 9, 7]


def test_to_uint8_matches_release_rounding():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2])
    expected = np.round(np.clip((x.numpy() + 1) / 2 * 255, 0, 255)).astype(np.uint8)
    assert to_uint8(x).tolist() == expected.tolist()
    assert engine_jit.to_model_input(torch.tensor([0, 255], dtype=torch.uint8), "cpu").tolist() == [-1.0, 1.0]


def test_param_groups_skip_biases_norms_and_frozen():
    model = Denoiser(tiny_args())
    no_decay, decay = misc.param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert "net.pos_embed" not in {names[id(p)] for p in no_decay["params"] + decay["params"]}
    assert "net.in_context_posemb" in {names[id(p)] for p in decay["params"]}


def test_resume_path_rules(tmp_path):
    assert resolve_checkpoint_path("") is None
    assert resolve_checkpoint_path(str(tmp_path)) is None  # existing folder without checkpoint: first launch
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    assert resolve_checkpoint_path(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    with pytest.raises(FileNotFoundError, match="--resume .*nope.pth: no such file or folder"):
        resolve_checkpoint_path(str(tmp_path / "nope.pth"))
    # sample.py and export.py: a folder without checkpoint-last.pth is an error naming their flag
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"^--checkpoint {empty}: the folder has no checkpoint-last.pth$"):
        resolve_checkpoint_path(str(empty), "--checkpoint", required=True)
    assert resolve_checkpoint_path(str(tmp_path), "--checkpoint", required=True) == str(tmp_path / "checkpoint-last.pth")


def test_resume_from_missing_file_stops_with_one_line(image_folder, tmp_path):
    result = subprocess.run([sys.executable, "main_jit.py", *TINY, "--data_path", str(image_folder),
                             "--output_dir", str(tmp_path), "--resume", str(tmp_path / "missing.pth")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"--resume {tmp_path / 'missing.pth'}: no such file or folder"
    assert not (tmp_path / "checkpoint-last.pth").exists()


def test_data_errors(image_folder, tmp_path):
    args = tiny_args("--data_path", str(tmp_path))
    with pytest.raises(SystemExit, match=r"--data_path .*: no train/ folder"):
        build_dataset(args, text=False)
    os.makedirs(tmp_path / "train" / "x")
    with pytest.raises(SystemExit, match=r"--data_path .*(Couldn't find|Found no valid file)"):
        build_dataset(args, text=False)
    args = tiny_args("--data_path", str(image_folder), "--class_num", "1")
    with pytest.raises(SystemExit, match=r"--class_num 1: .* has 2 class folders, so labels would reach 1"):
        build_dataset(args, text=False)


def test_one_answer_to_what_a_data_path_holds(tmp_path, make_args):
    """util/datasets.data_kind answers for main_jit.py, prepare_ref.py and prepare_data.py alike: a folder holding
    both train/ and images/ + captions/ is captioned data, so a -Text model trains on images/ and prepare_ref.py
    measures images/; a class model and prepare_data.py index train/."""
    import prepare_data
    import prepare_ref
    from text_image_dataset import TextImageDataset
    from util.datasets import CAPTIONED, HUGGING_FACE, IMAGE_FOLDER, SHARDS, data_kind

    layouts = {"shards": ["jit_shards.json"], "parquet": ["data/train-0.parquet"], "saved": ["state.json"],
               "both": ["train/a/0.png", "images/0.png", "captions/0.txt"], "folder": ["train/a/0.png"],
               "plain": ["x/0.png"]}
    for name, files in layouts.items():
        for file in files:
            os.makedirs(os.path.dirname(tmp_path / name / file), exist_ok=True)
            if file.endswith(".png"):
                Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / name / file)
            else:
                (tmp_path / name / file).write_text("a gray square" if file.endswith(".txt") else "")
    kinds = {name: data_kind(str(tmp_path / name)) for name in layouts}
    assert kinds == {"shards": SHARDS, "parquet": HUGGING_FACE, "saved": HUGGING_FACE, "both": CAPTIONED,
                     "folder": IMAGE_FOLDER, "plain": None}
    assert data_kind("hf:cifar10") == HUGGING_FACE
    both = str(tmp_path / "both")
    assert isinstance(build_dataset(make_args("--data_path", both, "--model", "JiT-T/4-Text"), text=True),
                      TextImageDataset)
    assert prepare_ref.image_root(both) == os.path.join(both, "images")
    assert prepare_ref.image_root(str(tmp_path / "folder")) == str(tmp_path / "folder" / "train")
    assert prepare_ref.image_root(str(tmp_path / "plain")) == str(tmp_path / "plain")
    assert build_dataset(make_args("--data_path", both), text=False).samples[0][0] == os.path.join(
        both, "train", "a", "0.png")
    with pytest.raises(SystemExit, match=r"^prepare_data.py: --data_path .*plain: no train/ folder of class"):
        prepare_data.main(prepare_data.get_args_parser().parse_args(["--data_path", str(tmp_path / "plain"),
                                                                      "--out", str(tmp_path / "out")]))
