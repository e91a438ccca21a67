"""Reading official-layout checkpoints (dict with model, model_ema1, model_ema2, optimizer, epoch, args), and the
exported model folders of export.py (config.json + model.safetensors: one weight set, no optimizer, no pickle)."""
import argparse
import glob
import json
import os
import random
import re
import zipfile

import numpy as np
import safetensors
import safetensors.torch
import torch


def read_checkpoint(path):
    """torch.load a checkpoint on the CPU; the official ones pickle an argparse.Namespace under 'args'. Files in
    torch.save's zip format (every one since torch 1.6) are memory-mapped: the ranks of a node share one copy in
    the page cache instead of each reading the whole file into its own memory (~19 GB for JiT-H/16)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def with_saved_args(args, saved):
    """args (e.g. main_jit.py's defaults) updated with a checkpoint's saved args: an argparse.Namespace (ours and the
    official checkpoints) or a dict; fields an older checkpoint lacks keep their defaults."""
    if saved is not None:
        for key, value in (vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)).items():
            setattr(args, key, value)
    return args


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
    """The CaptionLLM of a -Text model (text_conditioning.py), else None."""
    return getattr(denoiser.net.y_embedder, "caption_llm", None)


def check_text_encoder(denoiser, saved_fingerprint, path):
    """A -Text checkpoint records its LLM (CaptionLLM.fingerprint); loading it with another LLM, tokenizer
    or max_text_len is an error. The hub name / folder is not compared, so a local copy of the same LLM loads."""
    encoder = text_encoder_of(denoiser)
    if encoder is None or saved_fingerprint is None:
        return
    if saved_fingerprint.split("|")[1:] != encoder.fingerprint().split("|")[1:]:
        raise ValueError(f"{path}: trained with the text encoder {saved_fingerprint}, but this model uses "
                         f"{encoder.fingerprint()} (--llm_model_name / --max_text_len)")


def load_checkpoint(denoiser, path, checkpoint=None):
    """Fill `denoiser` (weights and both EMA tracks) strictly from a checkpoint file, or from its dict already read
    by read_checkpoint(path) (a checkpoint is read once per run); returns the checkpoint dict.

    A checkpoint without EMA entries (e.g. a bare {'model': ...}) initialises both tracks from its weights.
    """
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
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


def resolve_checkpoint_path(path, flag="--resume", required=False):
    """A checkpoint .pth file, or a folder holding checkpoint-last.pth -> the file to load (flag names the path in
    errors). A folder without checkpoint-last.pth gives None (a first launch of an auto-resuming job) unless required;
    a path that does not exist is a FileNotFoundError, never a silent fresh start."""
    if not path:
        return None
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        candidate = os.path.join(path, "checkpoint-last.pth")
        if os.path.isfile(candidate):
            return candidate
        if required:
            raise FileNotFoundError(f"{flag} {path}: the folder has no checkpoint-last.pth")
        return None
    raise FileNotFoundError(f"{flag} {path}: no such file or folder")


def continue_point(checkpoint):
    """(epoch, step) a run resumed from this checkpoint dict continues at: its resume_state (ours: mid-epoch position),
    else the epoch after its official `epoch` (the release's checkpoints)."""
    state = checkpoint.get("resume_state")
    return (state["epoch"], state["step"]) if state is not None else (checkpoint["epoch"] + 1, 0)


def checkpoints_in(folder):
    """The checkpoints a run writes into its --output_dir (checkpoint-last.pth, checkpoint-<epoch>.pth) found in
    folder, sorted; temporaries of an interrupted write excluded."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(name for name in names if re.fullmatch(r"checkpoint-(last|\d+)\.pth", name))


def rng_state():
    """This process's torch / CUDA / numpy / python RNG states, in tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def remove_stale_temporaries(output_dir):
    """Temporary files of a checkpoint write that was killed (they never replaced a checkpoint)."""
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth.tmp.*")):
        os.remove(path)


def save_checkpoint(path, denoiser, optimizer, epoch, args, resume_state=None):
    """Write a checkpoint in the official layout atomically: a temporary file in the same folder, fsynced, then
    renamed over `path`, so a crash at any instant leaves the previous or the new checkpoint, never a torn one.
    resume_state (beside the official keys, ignored by the original code): where to continue exactly, see
    main_jit.save_for_resume."""
    checkpoint = {
        "model": denoiser.state_dict(),
        "model_ema1": denoiser.ema_state_dict(1),
        "model_ema2": denoiser.ema_state_dict(2),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": args,
    }
    if resume_state is not None:
        checkpoint["resume_state"] = resume_state
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
    try:  # make the rename itself durable; the checkpoint is written either way, so a folder that cannot be
        # fsynced (some network file systems, Windows) must not turn this save into a reported failure
        folder_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
    except OSError:
        pass


# ------------------------------------------------------------------ exported models (export.py)
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"
PRETRAINED_FORMAT = "jit-denoiser"
# what a Denoiser is built from (main_jit.py flag names, so a config reads like the command line that trained it),
# then the sampler defaults; for class models the text fields are null, for -Text models class_num is
PRETRAINED_MODEL_FIELDS = ("model", "img_size", "class_num", "use_text_conditioning", "llm_model_name",
                           "max_text_len", "text_conditioning", "attn_dropout", "proj_dropout", "noise_scale", "P_mean", "P_std", "t_eps",
                           "label_drop_prob")
PRETRAINED_SAMPLER_FIELDS = ("sampling_method", "num_sampling_steps", "cfg", "interval_min", "interval_max")


def is_pretrained_folder(path):
    """A folder holding config.json or model.safetensors is an export (a missing partner is reported on loading)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in (PRETRAINED_CONFIG, PRETRAINED_WEIGHTS))


def weights_description(ema_track):
    return "live weights" if ema_track == 0 else f"EMA track {ema_track}"


def pretrained_config(args, text, text_encoder, ema_track, epoch, source):
    """config.json of an export: args is the training namespace (after defaults), text whether it is a -Text model,
    text_encoder the checkpoint's LLM fingerprint (or None), ema_track 0 (live weights), 1 or 2."""
    config = {"format": PRETRAINED_FORMAT, "format_version": 1}
    for name in PRETRAINED_MODEL_FIELDS + PRETRAINED_SAMPLER_FIELDS:
        config[name] = getattr(args, name)
        if name == "max_text_len":
            config["text_encoder"] = text_encoder
    config["use_text_conditioning"] = bool(text)
    if text:
        config["class_num"] = None
    else:
        config.update(llm_model_name=None, max_text_len=None, text_conditioning=None, text_encoder=None)
    config["weights"] = {"ema_track": ema_track,
                         "ema_decay": None if ema_track == 0 else getattr(args, f"ema_decay{ema_track}"),
                         "epoch": epoch, "checkpoint": os.path.basename(source)}
    return config


def _write_atomically(path, write):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(folder, state_dict, config):
    """Write <folder>/model.safetensors (state_dict as given: the Denoiser's net.* keys) and <folder>/config.json."""
    os.makedirs(folder, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    _write_atomically(os.path.join(folder, PRETRAINED_WEIGHTS),
                      lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    _write_atomically(os.path.join(folder, PRETRAINED_CONFIG), write_config)


def read_pretrained_config(folder):
    """The config.json of an exported folder, checked; one-line errors naming the file."""
    path = os.path.join(folder, PRETRAINED_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; an exported model folder holds {PRETRAINED_CONFIG} and "
                                f"{PRETRAINED_WEIGHTS} (written by export.py)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        raise ValueError(f"{path}: not a JiT export (no \"format\": \"{PRETRAINED_FORMAT}\"; written by export.py)")
    missing = [name for name in PRETRAINED_MODEL_FIELDS + PRETRAINED_SAMPLER_FIELDS + ("text_encoder", "weights")
               if name not in config]
    if missing:
        raise ValueError(f"{path}: field {missing[0]!r} is missing")
    return config


def load_pretrained(denoiser, folder, config):
    """Fill `denoiser` strictly from <folder>/model.safetensors (key and shape checks as for checkpoints). Both EMA
    tracks get the same weights: an export holds one weight set, so ema_weights(k) samples from it for any k."""
    path = os.path.join(folder, PRETRAINED_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; an exported model folder holds {PRETRAINED_CONFIG} and "
                                f"{PRETRAINED_WEIGHTS} (written by export.py)")
    try:
        state = safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    check_text_encoder(denoiser, config["text_encoder"], os.path.join(folder, PRETRAINED_CONFIG))
    check_state_dict(denoiser.state_dict(), state, path)
    denoiser.load_state_dict(state, strict=True)
    for track in (1, 2):
        denoiser.load_ema_state_dict(track, state)
