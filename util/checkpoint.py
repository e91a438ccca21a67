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


def text_encoder_of(denoiser):
    """The LLMTextEncoder of a -Text model, else None."""
    return getattr(denoiser.net.y_embedder, "encoder", None)


def check_text_encoder(denoiser, saved_fingerprint, path):
    """A -Text checkpoint records its LLM (LLMTextEncoder.fingerprint); loading it with another LLM, tokenizer
    or max_text_len is an error. The hub name / folder is not compared, so a local copy of the same LLM loads."""
    encoder = text_encoder_of(denoiser)
    if encoder is None or saved_fingerprint is None:
        return
    if saved_fingerprint.split("|")[1:] != encoder.fingerprint().split("|")[1:]:
        raise ValueError(f"{path}: trained with the text encoder {saved_fingerprint}, but this model uses "
                         f"{encoder.fingerprint()} (--llm_model_name / --max_text_len)")


def load_checkpoint(denoiser, path):
    """Fill `denoiser` (weights and both EMA tracks) strictly from a checkpoint file; returns the checkpoint dict.

    A checkpoint without EMA entries (e.g. a bare {'model': ...}) initialises both tracks from its weights.
    """
    checkpoint = read_checkpoint(path)
    if "model" not in checkpoint:
        raise ValueError(f"{path}: not a JiT checkpoint (no 'model' entry; keys: {sorted(checkpoint)[:6]})")
    check_text_encoder(denoiser, checkpoint.get("text_encoder"), path)
    expected = denoiser.state_dict()
    check_state_dict(expected, checkpoint["model"], f"{path} [model]")
    denoiser.load_state_dict(checkpoint["model"], strict=True)
    for track in (1, 2):
        ema = checkpoint.get(f"model_ema{track}", checkpoint["model"])
        check_state_dict(expected, ema, f"{path} [model_ema{track}]")
        denoiser.load_ema_state_dict(track, ema)
    return checkpoint


def resolve_resume_path(resume):
    """--resume names a .pth file or a folder holding checkpoint-last.pth.

    Returns the file to load, or None for an existing folder without a checkpoint yet (a first launch of an
    auto-resuming job). A path that does not exist is an error, never a silent fresh start.
    """
    if not resume:
        return None
    if os.path.isfile(resume):
        return resume
    if os.path.isdir(resume):
        path = os.path.join(resume, "checkpoint-last.pth")
        return path if os.path.isfile(path) else None
    raise FileNotFoundError(f"--resume {resume}: no such file or folder")


def save_checkpoint(path, denoiser, optimizer, epoch, args):
    """Write a checkpoint in the official layout atomically: a temporary file in the same folder, fsynced, then
    renamed over `path`, so a crash at any instant leaves the previous or the new checkpoint, never a torn one."""
    checkpoint = {
        "model": denoiser.state_dict(),
        "model_ema1": denoiser.ema_state_dict(1),
        "model_ema2": denoiser.ema_state_dict(2),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": args,
    }
    if text_encoder_of(denoiser) is not None:  # the frozen LLM itself is never saved, only which one it was
        checkpoint["text_encoder"] = text_encoder_of(denoiser).fingerprint()
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    folder_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder_fd)  # make the rename itself durable
    finally:
        os.close(folder_fd)
