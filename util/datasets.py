"""What --data_path (and --val_path) hold, built into training and validation samples and their loaders.

One answer to "which kind of data set is this" (data_kind) for main_jit.py, prepare_ref.py and prepare_data.py:
prepare_data.py shards, a Hugging Face data set, a captioned folder (images/ + captions/) or an ImageFolder root
(train/<class>/). Errors are one line naming the flag.
"""
import argparse
import atexit
import os
import random

import torch
from torch.utils.data import DataLoader
from torchvision import datasets

import util.misc as misc
from text_image_dataset import ImageNetWithCaptions, TextImageDataset
from util.args import is_text_model
from util.data import ImageSamples, ResumableSampler, check_data, holdout_split, read_prompts, train_transform
from util.hf_data import HFImages, is_hf_source
from util.preemption import ignore_stop_signals, stop_loader_workers
from util.shards import ShardDataset, is_shard_folder

SHARDS, HUGGING_FACE, CAPTIONED, IMAGE_FOLDER = "shards", "Hugging Face", "captioned", "ImageFolder"
HF_COLUMN_FLAGS = ("hf_image_column", "hf_label_column", "hf_caption_column")


def data_kind(path):
    """SHARDS, HUGGING_FACE, CAPTIONED (images/ and captions/), IMAGE_FOLDER (train/), or None for anything else."""
    if is_shard_folder(path):
        return SHARDS
    if is_hf_source(path):
        return HUGGING_FACE
    if all(os.path.isdir(os.path.join(path, sub)) for sub in ("images", "captions")):
        return CAPTIONED
    if os.path.isdir(os.path.join(path, "train")):
        return IMAGE_FOLDER
    return None


def image_folder(data_path):
    """The torchvision ImageFolder of <data_path>/train: the index (order, labels) of class models everywhere."""
    train_dir = os.path.join(data_path, "train")
    if not os.path.isdir(train_dir):
        raise ValueError(f"--data_path {data_path}: no train/ folder of class subfolders at {train_dir}")
    try:
        return datasets.ImageFolder(train_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--data_path {data_path}: {e}") from None


def open_shards(path, img_size):
    """The ShardDataset of a prepare_data.py folder holding img_size crops."""
    try:
        return ShardDataset(path, img_size)
    except ValueError as e:
        raise ValueError(f"--data_path {e}") from None


def build_dataset(args, text):
    """The training samples of --data_path: `.samples` [(path or row, label)] (and `.captions` for -Text models,
    whose labels index them), or a ShardDataset; class labels checked against --class_num."""
    try:
        dataset = find_dataset(args, text)
        return dataset if text else check_class_num(args, dataset)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def find_dataset(args, text):
    """The data set of --data_path for a class model or (text) a -Text model; ValueError naming the flag."""
    kind = data_kind(args.data_path)
    if kind == SHARDS:
        if text:
            raise ValueError(f"--data_path {args.data_path}: pre-cropped shards hold class labels only; -Text models "
                             f"train from images/ + captions/ or an ImageNet train/ folder")
        return open_shards(args.data_path, args.img_size)
    if kind == HUGGING_FACE:
        wrong = "hf_label_column" if text else "hf_caption_column"
        if getattr(args, wrong):
            raise ValueError(f"--{wrong} {getattr(args, wrong)}: {'-Text' if text else 'class'} models use "
                             f"--hf_{'caption' if text else 'label'}_column")
        return HFImages(args.data_path, args.hf_split, args.hf_image_column, labels="caption" if text else "class",
                        label_column=args.hf_label_column, caption_column=args.hf_caption_column,
                        class_num=args.class_num, on_bad=args.on_bad_data)
    given = [flag for flag in HF_COLUMN_FLAGS if getattr(args, flag)]
    if given:
        raise ValueError(f"--{given[0]} {getattr(args, given[0])}: --data_path {args.data_path} is not a Hugging "
                         f"Face data set (hf:<Hub name>, a save_to_disk folder or a folder of parquet files)")
    if not text:
        return image_folder(args.data_path)
    try:
        if kind == CAPTIONED:
            return TextImageDataset(args.data_path, on_bad=args.on_bad_data)
        train_dir = os.path.join(args.data_path, "train")
        if not os.path.isdir(train_dir):
            raise ValueError(f"no train/ folder of class subfolders at {train_dir} and no images/ + captions/ folders")
        return ImageNetWithCaptions(train_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--data_path {args.data_path}: {e}") from None


def check_class_num(args, dataset):
    """Labels index the class embedding: a class past --class_num would run off its end."""
    classes = getattr(dataset, "classes", [])  # folders and shards; Hugging Face labels are checked row by row
    if len(classes) > args.class_num:
        where = args.data_path if isinstance(dataset, ShardDataset) else os.path.join(args.data_path, "train")
        raise ValueError(f"--class_num {args.class_num}: {where} has {len(classes)} class folders, so labels would "
                         f"reach {len(classes) - 1}")
    return dataset


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
                                 show_progress=misc.is_main_process())
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
    """(samples, captions) of --val_path (its own captions, which index its own list), or (samples held out of
    `dataset`'s .samples by --val_fraction, []); (None, []) without validation."""
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
        return val_dataset.samples, list(val_dataset.captions) if text else []
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
    """Caption ids of min(num_images, N) of the N training images drawn by random.Random(seed): the same everywhere,
    and in the data set's caption frequencies, as the FID reference (the training images)."""
    labels = [label for _, label in dataset.samples]
    return [labels[i] for i in random.Random(seed).sample(range(len(labels)), min(num_images, len(labels)))]


def setup_captions(args, model_without_ddp, dataset, val_captions=()):
    """Give a -Text model its caption list (training captions, evaluation prompts, --val_path captions) and their
    caption store (the missing ones embedded first, across the ranks). Returns the evaluation caption indices."""
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
        model_without_ddp.net.y_embedder.use_captions(captions, args.text_cache_dir,
                                                      show_progress=misc.is_main_process())
    except ValueError as e:  # a store of another LLM (names its folder), features out of float16 range
        raise SystemExit(str(e))
    print(f"{len(captions)} distinct captions, {len(eval_ids)} evaluation prompts"
          + ("" if args.prompts_file else f" (captions of random training images, --seed {args.seed})"))
    if misc.is_main_process() and (args.online_eval or args.evaluate_gen):
        # beside the results: image n of every evaluation of this run is drawn for line n % len + 1
        with open(os.path.join(args.output_dir, "eval_prompts.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{captions[i]}\n" for i in eval_ids)
    return eval_ids


def training_data(args, model_without_ddp):
    """(training set or None, validation samples or None, evaluation label ids) of --data_path, --val_path and
    --val_fraction; a -Text model also gets its caption list (setup_captions)."""
    # --evaluate_gen reads the data only for the captions of a -Text model without --prompts_file
    text = is_text_model(args)
    dataset = None
    if not (args.evaluate_gen and (not text or args.prompts_file)):
        dataset = build_dataset(args, text)
    val_samples, val_captions = build_val_set(args, dataset, text) if not args.evaluate_gen else (None, [])
    if not text:
        return dataset, val_samples, list(range(args.class_num))
    eval_label_ids = setup_captions(args, model_without_ddp, dataset, val_captions)
    if val_captions:
        val_samples = shift_val_caption_ids(model_without_ddp, val_samples, val_captions)
    return dataset, val_samples, eval_label_ids
