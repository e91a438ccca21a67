"""Reading official-layout checkpoints (dict with model, model_ema1, model_ema2, optimizer, epoch, args)."""
import argparse
import os

import torch


def read_checkpoint(path):
    """torch.load a checkpoint on the CPU; the official ones pickle an argparse.Namespace under 'args'."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def check_state_dict(expected, given, source):
    """Raise ValueError naming the first key or shape of `given` that does not fit `expected` (a state_dict)."""
    for key, tensor in expected.items():
        if key not in given:
            raise ValueError(f"{source}: key {key} is missing; the checkpoint belongs to another model config")
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: key {key} has shape {tuple(given[key].shape)} but this model expects "
                             f"{tuple(tensor.shape)}; the checkpoint belongs to another model config or image size")
    for key in given:
        if key not in expected:
            raise ValueError(f"{source}: unexpected key {key}; the checkpoint belongs to another model config")


def load_checkpoint(denoiser, path):
    """Fill `denoiser` (weights and both EMA tracks) strictly from a checkpoint file; returns the checkpoint dict.

    A checkpoint without EMA entries (e.g. a bare {'model': ...}) initialises both tracks from its weights.
    """
    checkpoint = read_checkpoint(path)
    if "model" not in checkpoint:
        raise ValueError(f"{path}: not a JiT checkpoint (no 'model' entry; keys: {sorted(checkpoint)[:6]})")
    expected = denoiser.state_dict()
    check_state_dict(expected, checkpoint["model"], f"{path} [model]")
    denoiser.load_state_dict(checkpoint["model"], strict=True)
    for track in (1, 2):
        ema = checkpoint.get(f"model_ema{track}", checkpoint["model"])
        check_state_dict(expected, ema, f"{path} [model_ema{track}]")
        denoiser.load_ema_state_dict(track, ema)
    return checkpoint
