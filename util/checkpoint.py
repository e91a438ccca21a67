"""Checkpoints in the official layout (dict with model, model_ema1, model_ema2, optimizer, epoch, args): writing,
reading, which one a run resumes; and the model folders of export.py (config.json + model.safetensors: one weight
set, no optimizer, no pickle)."""
import argparse
import glob
import json
import os
import random
import re
import socket
import zipfile

import numpy as np
import safetensors
import safetensors.torch
import torch

import util.misc as misc
from util.args import SAMPLER_FIELDS, is_text_model


def read_checkpoint(path):
    """torch.load a checkpoint on the CPU (the official ones pickle an argparse.Namespace under 'args'), memory-mapped
    when in torch.save's zip format: the ranks of a node then share one copy in the page cache."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


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


def caption_llm_of(denoiser):
    """The CaptionLLM of a -Text model (text_conditioning.py), else None."""
    return getattr(denoiser.net.y_embedder, "caption_llm", None)


def same_caption_llm(fingerprint, other):
    """Whether two CaptionLLM fingerprints embed captions alike: the same LLM weights, tokenizer and max_text_len;
    the hub name or folder (the first field) is not compared, so a local copy of the same LLM counts as the same."""
    return fingerprint.split("|")[1:] == other.split("|")[1:]


def check_caption_llm(denoiser, saved_fingerprint, path):
    """Weights trained with another LLM, tokenizer or max_text_len (CaptionLLM.fingerprint, saved beside them) do not
    load (same_caption_llm)."""
    caption_llm = caption_llm_of(denoiser)
    if caption_llm is None or saved_fingerprint is None:
        return
    if not same_caption_llm(saved_fingerprint, caption_llm.fingerprint()):
        raise ValueError(f"{path}: trained with the caption LLM {saved_fingerprint}, but this model uses "
                         f"{caption_llm.fingerprint()} (--llm_model_name / --max_text_len)")


def load_weights(denoiser, state, source, llm_fingerprint, llm_source):
    """Fill the network strictly from one weight set (a state dict under the official keys)."""
    check_caption_llm(denoiser, llm_fingerprint, llm_source)
    check_state_dict(denoiser.state_dict(), state, source)
    denoiser.load_state_dict(state, strict=True)


def load_checkpoint(denoiser, path, checkpoint):
    """Fill `denoiser` (weights and both EMA tracks) strictly from the checkpoint dict read from `path`; a checkpoint
    without EMA entries (e.g. a bare {'model': ...}) initialises both tracks from its weights."""
    if "model" not in checkpoint:
        raise ValueError(f"{path}: not a JiT checkpoint (no 'model' entry; keys: {sorted(checkpoint)[:6]})")
    load_weights(denoiser, checkpoint["model"], f"{path} [model]", checkpoint.get("text_encoder"), path)
    for track in (1, 2):
        ema = checkpoint.get(f"model_ema{track}", checkpoint["model"])
        check_state_dict(denoiser.state_dict(), ema, f"{path} [model_ema{track}]")
        denoiser.load_ema_state_dict(track, ema)


def weight_set_entry(checkpoint, ema_track):
    """The checkpoint entry holding EMA track 1 or 2 (0: the live weights, 'model'); a checkpoint without EMA entries
    holds its live weights only."""
    entry = f"model_ema{ema_track}" if ema_track else "model"
    return entry if entry in checkpoint else "model"


def read_model_source(path, flag="--checkpoint"):
    """(path, saved args, checkpoint, config) of what `flag` names: a checkpoint .pth or a folder holding
    checkpoint-last.pth (config None), or an export folder (checkpoint None); one-line FileNotFoundError/ValueError."""
    # saved args: a checkpoint's `args` (None in an official file without them), or an export's fields
    if is_pretrained_folder(path):
        config = read_pretrained_config(path)
        return path, {name: config[name] for name in PRETRAINED_FIELDS}, None, config
    path = resolve_checkpoint_path(path, flag, required=True)
    try:
        checkpoint = read_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - anything that is not a torch checkpoint
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not a JiT checkpoint (no 'model' entry)")
    return path, checkpoint.get("args"), checkpoint, None


def resolve_checkpoint_path(path, flag="--resume", required=False):
    """A checkpoint .pth, or a folder holding checkpoint-last.pth -> the file; a folder without one -> None (the first
    launch of an auto-resuming job) unless required. A path that does not exist is an error, never a fresh start."""
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
    """Write a checkpoint in the official layout, atomically; resume_state (beside the official keys, which the
    original code ignores) says where to continue exactly (main_jit.save_for_resume)."""
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
    if caption_llm_of(denoiser) is not None:  # the frozen LLM itself is never saved, only which one it was
        checkpoint["text_encoder"] = caption_llm_of(denoiser).fingerprint()
    with misc.atomic_write(path, sync_folder=True) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)


# ------------------------------------------------------------------ resuming (main_jit.py)
def check_resume_compatible(args, path, saved):
    """The checkpoint's model, image size and class count (its saved args) must be this run's (one line naming the
    flags)."""
    for flag in ("model", "img_size", "class_num"):
        ours, theirs = getattr(args, flag), getattr(saved, flag, None)
        if theirs is not None and theirs != ours and not (flag == "class_num" and is_text_model(args)):
            raise SystemExit(f"--resume {path}: the checkpoint has --{flag} {theirs}, this run --{flag} {ours}")


def choose_checkpoint(args):
    """The checkpoint this run continues from (None: a fresh start), decided on rank 0 for every rank, or one line on
    every rank when it must not start (refuse_to_start, a --resume that names nothing)."""
    # decided once: a node that could not see the checkpoint would otherwise start at epoch 0 beside ranks resuming
    decision = [None, None]  # (path, error)
    if misc.is_main_process():
        try:
            decision = [resolve_checkpoint_path(args.resume), None]
        except FileNotFoundError as e:
            decision = [None, str(e)]
        if decision[1] is None:
            decision[1] = refuse_to_start(args, decision[0])
    if misc.is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(decision, src=0)
    path, error = decision
    if error:
        raise SystemExit(error)
    return path


def refuse_to_start(args, path):
    """Why this run must not start with checkpoint `path` (None: fresh), or None: training must not replace another
    run's checkpoints in --output_dir, and --evaluate_gen needs a checkpoint in a --resume folder."""
    if args.evaluate_gen:
        if args.resume and path is None:
            return (f"--resume {args.resume}: no checkpoint-last.pth there, nothing to evaluate (without --resume, "
                    f"--evaluate_gen evaluates the initial weights of --seed)")
        return None
    continues_here = path is not None and os.path.realpath(os.path.dirname(os.path.abspath(path))) == \
        os.path.realpath(args.output_dir)
    if continues_here:
        return None
    held = checkpoints_in(args.output_dir)
    if not held:
        return None
    name = "checkpoint-last.pth" if "checkpoint-last.pth" in held else held[-1]
    try:
        epoch, step = continue_point(read_checkpoint(os.path.join(args.output_dir, name)))
        saved = f"saved at epoch {epoch} step {step}"
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is still not ours to replace
        saved = f"unreadable: {type(e).__name__}"
    if path is None:
        return (f"--output_dir {args.output_dir} already holds {name} ({saved}): pass --resume {args.output_dir} to "
                f"continue that run, or choose another --output_dir")
    return (f"--output_dir {args.output_dir} already holds {name} ({saved}), which this run, resuming {path}, would "
            f"replace: choose another --output_dir")


def read_on_every_rank(path):
    """Every rank reads rank 0's checkpoint `path` and must find the same one; otherwise every rank stops with one line
    naming the first rank (and host) that cannot read it or reads another copy: the folder is not on a shared disk."""
    try:
        checkpoint, problem = read_checkpoint(path), None
        seen = continue_point(checkpoint)
    except Exception as e:  # noqa: BLE001 - missing, torn, or not a checkpoint: reported below, alike on every rank
        checkpoint, seen = None, None
        problem = (str(e) if isinstance(e, FileNotFoundError)
                   else f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    views = [(problem, seen, socket.gethostname())]
    if misc.is_dist_avail_and_initialized():
        views = [None] * misc.get_world_size()
        torch.distributed.all_gather_object(views, (problem, seen, socket.gethostname()))
    for rank, (problem, seen, host) in enumerate(views):
        if len(views) == 1 and problem:
            raise SystemExit(problem)
        if problem or seen != views[0][1]:
            what = (f"cannot read it ({problem})" if problem else f"reads another copy (saved at epoch {seen[0]} step "
                    f"{seen[1]}; rank 0's: epoch {views[0][1][0]} step {views[0][1][1]})")
            raise SystemExit(f"--resume {path}: rank {rank} on {host} {what}; every node must see the same "
                             f"checkpoint folder (a shared disk)")
    return checkpoint


# ------------------------------------------------------------------ exported models (export.py)
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"
PRETRAINED_FORMAT = "jit-denoiser"
# what a Denoiser is built from (main_jit.py flag names, so a config reads like the command line that trained it),
# then the sampler defaults; for class models the text fields are null, for -Text models class_num is
PRETRAINED_FIELDS = ("model", "img_size", "class_num", "use_text_conditioning", "llm_model_name", "max_text_len",
                     "text_conditioning", "attn_dropout", "proj_dropout", "noise_scale", "P_mean", "P_std", "t_eps",
                     "label_drop_prob") + SAMPLER_FIELDS


def is_pretrained_folder(path):
    """A folder holding config.json or model.safetensors is an export (a missing partner is reported on loading)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in (PRETRAINED_CONFIG, PRETRAINED_WEIGHTS))


def weights_description(ema_track):
    return "live weights" if ema_track == 0 else f"EMA track {ema_track}"


def pretrained_config(args, text, llm_fingerprint, ema_track, epoch, source):
    """config.json of an export: args is the training namespace (after defaults), text whether it is a -Text model,
    llm_fingerprint the checkpoint's caption LLM fingerprint (or None), ema_track 0 (live weights), 1 or 2."""
    config = {"format": PRETRAINED_FORMAT, "format_version": 1}
    for name in PRETRAINED_FIELDS:
        config[name] = getattr(args, name)
        if name == "max_text_len":
            config["text_encoder"] = llm_fingerprint
    config["use_text_conditioning"] = bool(text)
    if text:
        config["class_num"] = None
    else:
        config.update(llm_model_name=None, max_text_len=None, text_conditioning=None, text_encoder=None)
    config["weights"] = {"ema_track": ema_track,
                         "ema_decay": None if ema_track == 0 else getattr(args, f"ema_decay{ema_track}"),
                         "epoch": epoch, "checkpoint": os.path.basename(source)}
    return config


def save_pretrained(folder, state_dict, config):
    """Write <folder>/model.safetensors (state_dict as given: the Denoiser's net.* keys) and <folder>/config.json."""
    os.makedirs(folder, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    with misc.atomic_write(os.path.join(folder, PRETRAINED_WEIGHTS)) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
    with misc.atomic_write(os.path.join(folder, PRETRAINED_CONFIG)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


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
    missing = [name for name in PRETRAINED_FIELDS + ("text_encoder", "weights") if name not in config]
    if missing:
        raise ValueError(f"{path}: field {missing[0]!r} is missing")
    return config


def read_pretrained_weights(folder):
    """The state dict of <folder>/model.safetensors; one-line errors naming the file."""
    path = os.path.join(folder, PRETRAINED_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; an exported model folder holds {PRETRAINED_CONFIG} and "
                                f"{PRETRAINED_WEIGHTS} (written by export.py)")
    try:
        return safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_pretrained(denoiser, folder, config):
    """Fill the network strictly from <folder>/model.safetensors (key and shape checks as for checkpoints)."""
    load_weights(denoiser, read_pretrained_weights(folder), os.path.join(folder, PRETRAINED_WEIGHTS),
                 config["text_encoder"], os.path.join(folder, PRETRAINED_CONFIG))
