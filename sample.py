"""Sample images from a JiT checkpoint (ours or the official release layout): a grid PNG or individual PNGs.

    python sample.py --checkpoint demo_output/train --classes 0,3,8 --per_class 8 --ema 2 --out grid.png
    python sample.py --checkpoint jit-b-16.pth --cfg 3.0 --interval_min 0.1 --num_images 16 --out samples/
    python sample.py --checkpoint text_run --prompts "手書きの数字3" "a handwritten digit 7" --out grid.png
    python sample.py --checkpoint jit-b16-ema1 --classes 207,360 --out grid.png    # a folder written by export.py

The network is rebuilt from the `args` saved in the checkpoint (model, img_size, class_num, sampler settings), or
from the config.json of an exported folder; any flag given here overrides the saved value. --out ending in .png
writes a grid (one row per class or prompt with --per_class); anything else is a folder that receives one PNG per
image. -Text checkpoints need their LLM (--llm_model_name, default the one saved in the checkpoint) and read the
prompts' features from the caption store that training used (new prompts are embedded into it once).
"""
import argparse
import os

import torch

import util.misc as misc
from denoiser import Denoiser
from engine_jit import generate_uint8
from util.args import SAMPLER_FIELDS, add_sampler_flags, given_flags, is_text_model, training_args
from util.checkpoint import load_weights, read_model_source, weight_set_entry, weights_description
from util.data import read_prompts
from util.images import png_name, save_grid, save_png, save_prompt_list

# the ImageNet classes of the DiT/JiT sample figures, used as the default for 1000-class models
IMAGENET_SHOWCASE = [207, 360, 387, 974, 88, 979, 417, 279]
# -Text checkpoints sampled without --cfg: the README's text evaluation guidance (CFG 3.0 on t > 0.1), since a -Text
# training run saves main_jit's unguided default cfg 1.0, which draws prompts only faintly
TEXT_CFG, TEXT_INTERVAL_MIN = 3.0, 0.1
MODEL_FLAGS = ("model", "img_size", "class_num", "llm_model_name", "max_text_len")


def get_args_parser():
    parser = argparse.ArgumentParser("JiT sampling", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint .pth, a folder holding checkpoint-last.pth, or a folder written by export.py "
                             "(config.json + model.safetensors)")
    what = parser.add_argument_group("what to draw (class models: --classes; -Text models: --prompts/--prompts_file)")
    what.add_argument("--classes", default=None,
                      help="comma-separated class indices, e.g. 0,1,2 (default: every class when there are at most "
                           "16, else a spread of 8)")
    what.add_argument("--prompts", nargs="+", default=None, help="captions for a -Text model")
    what.add_argument("--prompts_file", default=None, help="captions for a -Text model, one per line")
    count = what.add_mutually_exclusive_group()
    count.add_argument("--per_class", type=int, default=None,
                       help="images per class or prompt (default 8); a grid gets one row per class or prompt")
    count.add_argument("--num_images", type=int, default=None,
                       help="total number of images, cycling through the classes or prompts")
    sampler = parser.add_argument_group("sampler (default: the values saved in the checkpoint)")
    sampler.add_argument("--ema", type=int, choices=[0, 1, 2], default=None,
                         help="weights: 1 or 2 = EMA track, 0 = live (trained) weights "
                              "(default: the checkpoint's --eval_ema, else 1; an exported folder has one weight set)")
    add_sampler_flags(sampler)
    sampler.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                         help="autocast dtype of this machine (not the checkpoint's): auto = bf16 unless the CPU "
                              "lacks native bf16")
    sampler.add_argument("--seed", type=int, default=0)
    sampler.add_argument("--gen_bsz", type=int, default=32, help="images per network batch")
    model = parser.add_argument_group("model (default: the values saved in the checkpoint)")
    model.add_argument("--model", default=None, help="model config, for checkpoints without saved args")
    model.add_argument("--img_size", type=int, default=None)
    model.add_argument("--class_num", type=int, default=None)
    model.add_argument("--llm_model_name", default=None, help="hub name or local folder of the LLM (-Text models)")
    model.add_argument("--max_text_len", type=int, default=None)
    model.add_argument("--text_cache_dir", default=None,
                       help="folder of the caption feature stores (default: main_jit.py's)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N, cpu or mps (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="samples.png",
                        help="a .png path for a grid, or a folder for individual PNGs")
    parser.add_argument("--nrow", type=int, default=None,
                        help="grid columns (default: --per_class, or the number of classes with --num_images)")
    return parser


def parse_classes(text, class_num):
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes {text}: expected comma-separated class indices, e.g. 0,1,2") from None
    if not classes:
        raise ValueError(f"--classes {text}: no class index given")
    bad = [c for c in classes if not 0 <= c < class_num]
    if bad:
        raise ValueError(f"--classes {text}: class index {bad[0]} is out of range; this checkpoint has class_num "
                         f"{class_num} (valid classes 0..{class_num - 1})")
    return classes


def default_classes(class_num):
    if class_num <= 16:
        return list(range(class_num))
    if class_num == 1000:
        return IMAGENET_SHOWCASE
    return sorted({round(i * (class_num - 1) / 7) for i in range(8)})


def cli_prompts(cli):
    """--prompts, then the lines of --prompts_file."""
    prompts = list(cli.prompts or []) + (read_prompts(cli.prompts_file) if cli.prompts_file else [])
    prompts = [p.strip() for p in prompts]
    if any(not p for p in prompts) or not prompts:
        raise ValueError("empty prompt: give non-empty captions with --prompts or --prompts_file")
    return prompts


def load_model(cli, device):
    """(sampling Denoiser on `device` with the chosen weights, its settings, where it is from, which weights): built
    from the checkpoint's saved args or the export's config, overridden by the flags given here."""
    path, saved_args, checkpoint, config = read_model_source(cli.checkpoint)
    if config is not None and cli.ema is not None:
        raise ValueError(f"--ema {cli.ema}: {path} is an exported model holding one weight set (the "
                         f"{weights_description(config['weights']['ema_track'])} of its checkpoint); --ema chooses "
                         f"among the weights of a .pth checkpoint")
    missing = [f"--{flag}" for flag in ("model", "img_size", "class_num") if getattr(cli, flag) is None]
    if saved_args is None and missing:
        raise ValueError(f"{path} has no saved 'args' (an official checkpoint?): give {', '.join(missing)}")
    args = training_args(saved_args, **given_flags(cli, MODEL_FLAGS + SAMPLER_FIELDS + ("gen_bsz", "text_cache_dir")))
    text = is_text_model(args)
    if text and cli.classes is not None:
        raise ValueError(f"{path} is a text-to-image model ({args.model}): give --prompts or --prompts_file, not "
                         f"--classes")
    if not text and (cli.prompts or cli.prompts_file):
        raise ValueError(f"{path} is a class-conditional model ({args.model}, class_num {args.class_num}): --prompts "
                         f"and --prompts_file need a -Text checkpoint; use --classes")
    if text and cli.cfg is None and args.cfg == 1.0:
        args.cfg = TEXT_CFG
        args.interval_min = TEXT_INTERVAL_MIN if cli.interval_min is None else args.interval_min
        print(f"-Text checkpoint, no --cfg: CFG {args.cfg:g} for t in ({args.interval_min:g}, {args.interval_max:g}), "
              f"the README's text evaluation guidance (--cfg 1 for unguided samples)")
    try:
        if config is not None:
            model = Denoiser.from_pretrained(path, **given_flags(cli, MODEL_FLAGS),
                                             **{name: getattr(args, name) for name in SAMPLER_FIELDS})
        else:
            model = Denoiser(args, with_ema=False)
    except (ValueError, OSError, KeyError) as e:
        hint = f" (LLM {args.llm_model_name}: set --llm_model_name to a local folder)" if text else ""
        raise ValueError(f"cannot build {args.model} at img_size {args.img_size}{hint}: "
                         f"{str(e).splitlines()[0]}") from None
    if config is not None:
        weights = f"exported {weights_description(config['weights']['ema_track'])}"
    else:
        ema = cli.ema if cli.ema is not None else args.eval_ema
        entry = weight_set_entry(checkpoint, ema)
        load_weights(model, checkpoint[entry], f"{path} [{entry}]", checkpoint.get("text_encoder"), path)
        weights = "live weights" if ema == 0 else f"EMA track {ema} (decay {getattr(args, f'ema_decay{ema}'):g})"
    return model.to(device).eval(), args, f"{args.model} @ {args.img_size}px from {path}", weights


def main(argv=None):
    cli = get_args_parser().parse_args(argv)
    for name in ("per_class", "num_images", "gen_bsz", "num_sampling_steps", "nrow"):
        value = getattr(cli, name)
        if value is not None and value < 1:
            raise SystemExit(f"sample.py: error: --{name} must be at least 1, got {value}")
    device = misc.resolve_device(cli.device)
    precision = misc.resolve_precision(cli.precision, device)
    misc.keep_freed_cpu_memory(device)
    try:
        model, args, source, weights = load_model(cli, device)
        text = is_text_model(args)
        if text:
            targets = cli_prompts(cli)
            # the training captions' store: a prompt seen in training gets the very rows training read; the LLM's
            # weights are loaded only if a prompt is new to it, and released before sampling
            model.net.y_embedder.use_captions(targets, args.text_cache_dir)
            ids = list(range(len(targets)))
        else:
            ids = default_classes(args.class_num) if cli.classes is None else parse_classes(cli.classes, args.class_num)
            targets = ids
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: error: {e}") from None
    args.precision = precision
    if cli.num_images is not None:
        labels = [ids[i % len(ids)] for i in range(cli.num_images)]
        nrow = cli.nrow or (len(ids) if len(ids) <= 16 else 8)
    else:
        per_class = cli.per_class or 8
        labels = [i for i in ids for _ in range(per_class)]
        nrow = cli.nrow or per_class

    misc.seed_everything(cli.seed)
    print(f"{source}: {len(labels)} images, {weights}, {args.sampling_method} {args.num_sampling_steps} steps, cfg "
          f"{args.cfg:g} on ({args.interval_min:g}, {args.interval_max:g}), {args.precision} on {device}", flush=True)
    chunks = []
    generate_uint8(model, torch.tensor(labels), device, args, lambda images, _: chunks.append(images))
    images = torch.cat(chunks)

    captions = [targets[i] for i in labels] if text else None
    if cli.out.lower().endswith(".png"):
        os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
        save_grid(images, cli.out, captions, nrow=nrow)
        print(f"wrote a {len(images)}-image grid ({nrow} columns) to {cli.out}")
        return
    os.makedirs(cli.out, exist_ok=True)
    names = [png_name(n, label, text, digits=4) for n, label in enumerate(labels)]
    for image, name in zip(images, names):
        save_png(image, os.path.join(cli.out, name))
    if text:
        save_prompt_list(cli.out, names, [targets[label] for label in labels])
    print(f"wrote {len(images)} PNGs to {cli.out}")


if __name__ == "__main__":
    main()
