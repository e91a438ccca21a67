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

from denoiser import Denoiser
from model_jit import JiT_models
from util.args import SAMPLER_FIELDS, add_sampler_flags, given_flags, is_text_model, training_args
from util.checkpoint import (check_state_dict, pretrained_config, read_model_source, save_pretrained,
                             weights_description)

MODEL_FLAGS = ("model", "img_size", "class_num")


def get_args_parser():
    parser = argparse.ArgumentParser("JiT export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint .pth, or a folder holding checkpoint-last.pth")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    parser.add_argument("--ema", type=int, choices=[0, 1, 2], default=None,
                        help="weights: EMA track 1 or 2, or 0 for the live weights (default: the checkpoint's "
                             "--eval_ema, else 1)")
    add_sampler_flags(parser.add_argument_group("sampler defaults written to config.json (default: the checkpoint's)"))
    model = parser.add_argument_group("model (only for checkpoints without saved args)")
    model.add_argument("--model", default=None)
    model.add_argument("--img_size", type=int, default=None)
    model.add_argument("--class_num", type=int, default=None)
    return parser


def export(cli):
    """Write the chosen weight set of --checkpoint and its config.json into --out; ValueError for bad input."""
    path, saved_args, checkpoint, config = read_model_source(cli.checkpoint)
    if config is not None:
        raise ValueError(f"--checkpoint {path}: already an exported model folder (config.json + model.safetensors); "
                         f"export.py reads a checkpoint .pth or a folder holding checkpoint-last.pth")
    if saved_args is None and any(getattr(cli, flag) is None for flag in MODEL_FLAGS):
        raise ValueError(f"{path} has no saved 'args': give --model, --img_size and --class_num")
    args = training_args(saved_args, **given_flags(cli, MODEL_FLAGS + SAMPLER_FIELDS))
    if args.model not in JiT_models:
        raise ValueError(f"--model {args.model}: unknown model config")
    ema = cli.ema if cli.ema is not None else args.eval_ema
    entry = "model" if ema == 0 else f"model_ema{ema}"
    if entry not in checkpoint:
        raise ValueError(f"{path} has no '{entry}' entry; export the live weights with --ema 0")
    state = checkpoint[entry]
    text = is_text_model(args)
    if not text:  # a -Text network needs its LLM to be built; sample.py / from_pretrained check it on loading
        with torch.device("meta"):
            expected = Denoiser(args, with_ema=False).state_dict()
        check_state_dict(expected, state, f"{path} [{entry}]")
    config = pretrained_config(args, text, checkpoint.get("text_encoder"), ema, checkpoint.get("epoch"), path)
    save_pretrained(cli.out, state, config)
    decay = "" if ema == 0 else f" (decay {config['weights']['ema_decay']:g})"
    size = os.path.getsize(os.path.join(cli.out, "model.safetensors"))
    print(f"exported {args.model} @ {args.img_size}px, {weights_description(ema)}{decay} of {path} "
          f"(epoch {checkpoint.get('epoch')}) to {cli.out}/model.safetensors ({len(state)} tensors, "
          f"{size / 2 ** 20:.1f} MiB) + config.json")


def main(argv=None):
    try:
        export(get_args_parser().parse_args(argv))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export.py: error: {e}") from None


if __name__ == "__main__":
    main()
