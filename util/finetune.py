"""--finetune: a new run that starts from the weights of a trained JiT (an official checkpoint, one of ours, or an
export.py folder) instead of the initialisation, with its own optimizer, schedule and checkpoints."""
import torch

import util.misc as misc
from util.args import is_text_model, training_args
from util.checkpoint import (caption_llm_of, read_model_source, read_pretrained_weights, same_caption_llm,
                             weight_set_entry, weights_description)

CONDITION = "net.y_embedder."  # the class table, or the text projection and null condition of -Text models
POSITIONS = "net.pos_embed"  # the fixed sin-cos table of the patch grid: a function of the image size, not trained


def fit_weights(target, source, source_name):
    """`source` (a state dict of another run) fitted to `target` (this model's freshly initialised state dict):
    returns (state dict to load, names loaded, [(name, their shape or None, this shape)] kept from this model's init).

    The condition embedder is this model's own where it does not fit (another class count: the label table as the
    release initialises it; class -> -Text: the text projection and null condition), and so is the position table
    (another image size: its own sin-cos table). Any other tensor missing or of another shape is a ValueError naming
    it and both shapes."""
    state, loaded, kept = {}, [], []
    for name, mine in target.items():
        theirs = source.get(name)
        if theirs is not None and tuple(theirs.shape) == tuple(mine.shape):
            state[name] = theirs
            loaded.append(name)
        elif name.startswith(CONDITION) or name == POSITIONS:
            state[name] = mine
            kept.append((name, None if theirs is None else tuple(theirs.shape), tuple(mine.shape)))
        elif theirs is None:
            raise ValueError(f"{source_name}: has no tensor {name} {tuple(mine.shape)}: another model config")
        else:
            raise ValueError(f"{source_name}: {name} has shape {tuple(theirs.shape)}, this model "
                             f"{tuple(mine.shape)}: another model config or patch size")
    unexpected = [name for name in source if name not in target and not name.startswith(CONDITION)]
    if unexpected:
        raise ValueError(f"{source_name}: tensor {unexpected[0]} {tuple(source[unexpected[0]].shape)} has no place "
                         f"in this model: another model config")
    return state, loaded, kept


def describe_fit(source_name, weights, loaded, kept):
    """One line: what --finetune loaded and what it kept from the new model's initialisation."""
    def shape(dims):
        return "none" if dims is None else "x".join(map(str, dims))

    fresh = "; ".join(f"{name} {shape(theirs)} -> {shape(mine)}" for name, theirs, mine in kept)
    return (f"fine-tuning from {source_name} ({weights}): {len(loaded)} tensors loaded, "
            + (f"initialised anew: {fresh}" if kept else "none initialised anew"))


def source_weights(args):
    """(name, weights description, state dict, the caption LLM fingerprint it was trained with, whether it is a -Text
    model) of --finetune: a checkpoint's --finetune_ema weight set, or an export's one weight set."""
    path, saved_args, checkpoint, config = read_model_source(args.finetune, "--finetune")
    if checkpoint is None:
        weights = f"exported {weights_description(config['weights']['ema_track'])}"
        return (path, weights, read_pretrained_weights(path), config["text_encoder"],
                bool(config["use_text_conditioning"]))
    entry = weight_set_entry(checkpoint, args.finetune_ema)  # "model" also when the checkpoint holds no EMA tracks
    text = saved_args is not None and is_text_model(training_args(saved_args))
    weights = weights_description(args.finetune_ema if entry != "model" else 0)
    return path, weights, checkpoint[entry], checkpoint.get("text_encoder"), text


def finetune(args, denoiser):
    """Load --finetune's weights into `denoiser` and both its EMA tracks (fit_weights), read on rank 0 only: DDP
    hands its weights, and main_jit.distribute its EMA tracks, to the other ranks, so only rank 0 needs the file. One
    line says what was loaded; every rank stops with the same line when the weights do not fit."""
    outcome = [None, None]  # (the line to print, the error)
    if misc.is_main_process():
        try:
            name, weights, state, fingerprint, text = source_weights(args)
            mine = caption_llm_of(denoiser)
            same_condition = text == is_text_model(args) and (mine is None or fingerprint is None or
                                                               same_caption_llm(fingerprint, mine.fingerprint()))
            if not same_condition:  # class <-> text, or captions embedded by another LLM: the condition starts anew
                state = {key: value for key, value in state.items() if not key.startswith(CONDITION)}
            state, loaded, kept = fit_weights(denoiser.state_dict(), state, name)
            with torch.no_grad():
                denoiser.load_state_dict(state)
                for track in (1, 2):
                    denoiser.load_ema_state_dict(track, state)
            outcome[0] = describe_fit(name, weights, loaded, kept)
        except (FileNotFoundError, ValueError) as e:
            outcome[1] = str(e)
    if misc.is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1]:
        raise SystemExit(outcome[1])
    print(outcome[0])
