"""Training data that survives bad files, and a sampler that resumes mid-epoch.

Every dataset kind (ImageFolder, TextImageDataset, ImageNetWithCaptions, a Hugging Face split) is indexed once into
(path, label) pairs, where a Hugging Face "path" is a row (util/hf_data.Row); ImageSamples decodes them. A file that
cannot be decoded stops the run naming it (--on_bad_data error) or is replaced by the next readable sample, with that
sample's own label (skip): labels never shift.
"""
import functools
import hashlib
import os
import warnings

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.crop import center_crop_arr

# the image files of every data path, matched in any case (.JPG, .Png): torchvision's list, because ImageFolder
# (class models, ImageNetWithCaptions) applies it and cannot be given another; TextImageDataset and prepare_ref.py
# use it too, so a folder trains and is measured on the same files
IMAGE_EXTENSIONS = IMG_EXTENSIONS


def load_rgb(source):
    """Decode an image (a path, or a binary file object such as io.BytesIO of stored bytes) to 8-bit RGB: 16-bit
    and float grayscale are rescaled (not clipped), images with transparency (RGBA, LA, palette with transparency)
    are composited over white, CMYK is converted. The one decoder of every data path (class, text, prepare_ref.py)."""
    with Image.open(source) as image:
        image.load()  # decode now: a truncated file fails here, inside the try of the caller
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_sample(path):
    """The RGB image of a sample: a file path, or a data set row that reads its stored bytes (util/hf_data.Row)."""
    return load_rgb(path) if isinstance(path, (str, os.PathLike)) else path.load()


def train_transform(img_size):
    """ADM center crop to a uint8 tensor. The random flip happens on the device, from the checkpointed RNG, so a
    resumed run sees the same augmentation."""
    return transforms.Compose([
        transforms.Lambda(functools.partial(center_crop_arr, image_size=img_size)),
        transforms.PILToTensor(),
    ])


def unreadable_message(path, error):
    return f"{path}: unreadable image ({type(error).__name__}: {error})"


class UnreadableImage(RuntimeError):
    """A bad file met during training with --on_bad_data error. From a DataLoader worker, torch re-raises it in the
    main process with the worker's traceback inside the message; .line is the one-line message alone."""

    @property
    def line(self):
        return str(self).rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]


class ImageSamples(Dataset):
    def __init__(self, samples, transform, on_bad="error"):
        self.samples = list(samples)
        self.transform = transform
        self.on_bad = on_bad

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return self.transform(load_sample(path)), label
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                if self.on_bad == "error":
                    raise UnreadableImage(f"{unreadable_message(path, e)}; fix or remove it, "
                                          f"or pass --on_bad_data skip") from None
                warnings.warn(f"{unreadable_message(path, e)}; skipped")
        raise RuntimeError("no readable image in the data set")


def _check_one(samples, index):
    path = samples[index][0]
    try:
        load_sample(path)
        return None
    except Exception as e:  # noqa: BLE001
        return f"{path}: {type(e).__name__}: {e}"


class _CheckDataset(Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return _check_one(self.samples, index)


def check_data(samples, on_bad, num_workers=2, show_progress=True):
    """Decode every file once (--check_data). Returns the readable samples; stops with the list of bad files
    when on_bad is 'error'."""
    from util.misc import progress_bar
    loader = DataLoader(_CheckDataset(samples), batch_size=64, num_workers=num_workers, collate_fn=list)
    problems = [p for batch in progress_bar(loader, desc="check_data", disable=not show_progress) for p in batch if p]
    if problems and on_bad == "error":
        raise SystemExit(f"--check_data: {len(problems)} unreadable file(s); fix them or pass --on_bad_data skip:\n"
                         + "\n".join(problems))
    if problems:
        warnings.warn(f"--check_data: skipping {len(problems)} unreadable file(s):\n" + "\n".join(problems))
    bad = {p.split(": ", 1)[0] for p in problems}
    return [s for s in samples if str(s[0]) not in bad]


def holdout_split(samples, fraction, root):
    """(training samples, held-out samples) for --val_fraction: the round(fraction * n) samples whose path relative
    to root (a data set row: its row index) has the smallest SHA-256, each list in the original order. No RNG is
    involved, so the split is the same on every rank, every resume and every --seed, and adding images to the folder
    moves few others across it."""
    def key(index):
        path = samples[index][0]
        name = os.path.relpath(path, root) if isinstance(path, (str, os.PathLike)) else f"row {path.index}"
        return hashlib.sha256(name.encode()).digest()

    held = set(sorted(range(len(samples)), key=key)[:round(fraction * len(samples))])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def index_captions(pairs):
    """(distinct captions in order of first appearance, [(item, caption id)]) of (item, caption) pairs: the caption
    list of captioned data sets, whose ids the model reads like class labels."""
    ids = {}
    for _, caption in pairs:
        ids.setdefault(caption, len(ids))
    return list(ids), [(item, ids[caption]) for item, caption in pairs]


def read_prompts(path):
    """The prompts of a --prompts_file, one per line (a UTF-8 BOM is dropped). A blank line is a ValueError naming
    the file and line: it would be an empty caption, or shift the prompts."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts_file {path}: {e}") from None
    if not lines:
        raise ValueError(f"--prompts_file {path}: no prompts (one per line)")
    blank = [n for n, line in enumerate(lines, start=1) if not line.strip()]
    if blank:
        raise ValueError(f"--prompts_file {path}: line {blank[0]} is blank ({len(blank)} blank line(s)); "
                         f"give one prompt per line")
    return [line.strip() for line in lines]


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start at a given position, to resume mid-epoch exactly."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch, start_index=0):
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index
