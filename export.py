"""Export one weight set of a JiT checkpoint (ours or an official checkpoint-last.pth) as a model folder:

    python export.py --checkpoint output_dir --ema 1 --out jit-b16-ema1
    python export.py --checkpoint jit-b-16/checkpoint-last.pth --cfg 3.0 --interval_min 0.1 --out jit-b16

writes <out>/model.safetensors (the weights under the checkpoint's own keys, net.*) and <out>/config.json (model,
image size, class count or LLM, noise and time settings, sampler defaults, which weights). Load it with
`Denoiser.from_pretrained(<out>)` or `python sample.py --checkpoint <out>`. The model and sampler settings come from
the `args` saved in the checkpoint (main_jit.py's defaults for fields an older checkpoint lacks); flags given here
override them.
"""
import argparse
import os

import torch

from denoiser import Denoiser, is_text_model
from main_jit import get_args_parser as main_parser
from model_jit import JiT_models
from util.checkpoint import (check_state_dict, pretrained_config, read_checkpoint, resolve_checkpoint_path,
                             save_pretrained, weights_description, with_saved_args)

OVERRIDES = ("model", "img_size", "class_num", "cfg", "interval_min", "interval_max", "num_sampling_steps",
             "sampling_method")


def fail(message):
    raise SystemExit(f"export.py: error: {message}")


def get_args_parser():
    parser = argparse.ArgumentParser("JiT export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint .pth, or a folder holding checkpoint-last.pth")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    parser.add_argument("--ema", type=int, choices=[0, 1, 2], default=None,
                        help="weights: EMA track 1 or 2, or 0 for the live weights (default: the checkpoint's "
                             "--eval_ema, else 1)")
    sampler = parser.add_argument_group("sampler defaults written to config.json (default: the checkpoint's)")
    sampler.add_argument("--cfg", type=float, default=None)
    sampler.add_argument("--interval_min", type=float, default=None)
    sampler.add_argument("--interval_max", type=float, default=None)
    sampler.add_argument("--num_sampling_steps", type=int, default=None)
    sampler.add_argument("--sampling_method", choices=["euler", "heun"], default=None)
    model = parser.add_argument_group("model (only for checkpoints without saved args)")
    model.add_argument("--model", default=None)
    model.add_argument("--img_size", type=int, default=None)
    model.add_argument("--class_num", type=int, default=None)
    return parser


def training_args(saved, cli):
    """main_jit.py's defaults, updated with the checkpoint's saved args, then with the flags given here."""
    args = with_saved_args(main_parser().parse_args([]), saved)
    for key in OVERRIDES:
        if getattr(cli, key) is not None:
            setattr(args, key, getattr(cli, key))
    return args


def main(argv=None):
    cli = get_args_parser().parse_args(argv)
    try:
        path = resolve_checkpoint_path(cli.checkpoint, "--checkpoint", required=True)
    except FileNotFoundError as e:
        fail(str(e))
    try:
        checkpoint = read_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - anything that is not a torch checkpoint
        fail(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        fail(f"{path}: not a JiT checkpoint (no 'model' entry)")
    saved = checkpoint.get("args")
    if saved is None and (cli.model is None or cli.img_size is None or cli.class_num is None):
        fail(f"{path} has no saved 'args': give --model, --img_size and --class_num")
    args = training_args(saved, cli)
    if args.model not in JiT_models:
        fail(f"--model {args.model}: unknown model config")
    ema = cli.ema if cli.ema is not None else getattr(args, "eval_ema", 1)
    entry = "model" if ema == 0 else f"model_ema{ema}"
    if entry not in checkpoint:
        fail(f"{path} has no '{entry}' entry; export the live weights with --ema 0")
    state = checkpoint[entry]
    text = is_text_model(args)
    if not text:  # a -Text network needs its LLM to be built; sample.py / from_pretrained check it on loading
        with torch.device("meta"):
            expected = Denoiser(args).state_dict()
        try:
            check_state_dict(expected, state, f"{path} [{entry}]")
        except ValueError as e:
            fail(str(e))
    config = pretrained_config(args, text, checkpoint.get("text_encoder"), ema, checkpoint.get("epoch"), path)
    save_pretrained(cli.out, state, config)
    decay = "" if ema == 0 else f" (decay {config['weights']['ema_decay']:g})"
    size = os.path.getsize(os.path.join(cli.out, "model.safetensors"))
    print(f"exported {args.model} @ {args.img_size}px, {weights_description(ema)}{decay} of {path} "
          f"(epoch {checkpoint.get('epoch')}) to {cli.out}/model.safetensors ({len(state)} tensors, "
          f"{size / 2 ** 20:.1f} MiB) + config.json")


if __name__ == "__main__":
    main()
