"""Caption-conditioned datasets for text-to-image training (an extension: the JiT release is class-conditional).

A sample is (transform(PIL RGB image), caption_id); `dataset.captions` lists the captions and caption_id indexes
it. Each caption is embedded once by the frozen LLM into the caption feature store (util/text_store.py), whose
rows the model looks up by caption_id like a class label.
"""
import os
import re
import warnings

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched in any case (.JPG, .Png, ...)
IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "util", "imagenet_classes.txt")


def load_image(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class TextImageDataset(Dataset):
    """Images `<root>/images/*.{jpg,jpeg,png}` (extension in any case) captioned by `<root>/captions/<stem>.txt`.

    A caption file holds one UTF-8 line (a BOM and surrounding whitespace are stripped). Problems found when the
    dataset is built: an image without caption file, an empty caption, a caption file that cannot be read or is not
    UTF-8 or has more than one non-empty line, a caption file without image. on_bad='error' (default) raises a
    ValueError: one line naming the path for one problem, else a summary line and one line per problem; on_bad='skip' warns
    once with the count and the paths, and drops those samples. The images themselves are decoded only in
    __getitem__. Samples are in sorted file-name order; `.captions` are the distinct captions in order of first
    appearance, `.samples` the (image path, caption_id) pairs, `.targets` the caption_ids.
    """

    def __init__(self, root, transform=None, on_bad="error"):
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.root = str(root)
        self.transform = transform
        image_dir = os.path.join(self.root, "images")
        caption_dir = os.path.join(self.root, "captions")
        for folder in (image_dir, caption_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"TextImageDataset: {folder} is not a folder "
                                        f"(expected {self.root}/images/*.jpg|jpeg|png and {self.root}/captions/*.txt)")

        images = sorted(name for name in os.listdir(image_dir)
                        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(image_dir, name)))
        caption_files = sorted(name for name in os.listdir(caption_dir)
                               if name.endswith(".txt") and os.path.isfile(os.path.join(caption_dir, name)))
        image_stems = {os.path.splitext(name)[0] for name in images}

        problems = []  # (path, reason)
        samples = []  # (image path, caption text)
        for name in images:
            image_path = os.path.join(image_dir, name)
            caption_path = os.path.join(caption_dir, os.path.splitext(name)[0] + ".txt")
            if not os.path.isfile(caption_path):
                problems.append((image_path, f"no caption file {caption_path}"))
                continue
            caption, reason = self._read_caption(caption_path)
            if reason is not None:
                problems.append((caption_path, f"{reason} (caption of {image_path})"))
                continue
            samples.append((image_path, caption))
        for name in caption_files:
            stem = os.path.splitext(name)[0]
            if stem not in image_stems:
                problems.append((os.path.join(caption_dir, name),
                                 f"caption file without image (no {stem}.jpg|jpeg|png in {image_dir})"))

        if problems:
            lines = [f"  {path}: {reason}" for path, reason in problems]
            if on_bad == "error" and len(problems) == 1:  # one line naming the file
                raise ValueError(f"TextImageDataset({self.root}): {lines[0].strip()}; fix it or pass on_bad='skip'")
            if on_bad == "error":
                raise ValueError("\n".join([f"TextImageDataset({self.root}): {len(problems)} problem(s) in the "
                                            f"data; fix them or pass on_bad='skip' to drop those samples"] + lines))
            warnings.warn("\n".join([f"TextImageDataset({self.root}): skipping {len(problems)} problem(s); "
                                     f"{len(samples)} samples kept"] + lines), stacklevel=2)
        if not samples:
            raise ValueError(f"TextImageDataset({self.root}): no usable image/caption pairs")

        self.captions = []
        caption_ids = {}
        self.samples = []
        for image_path, caption in samples:
            if caption not in caption_ids:
                caption_ids[caption] = len(self.captions)
                self.captions.append(caption)
            self.samples.append((image_path, caption_ids[caption]))
        self.targets = [caption_id for _, caption_id in self.samples]  # as ImageFolder.targets
        self.problems = problems

    @staticmethod
    def _read_caption(path):
        """(caption, None) or (None, reason)."""
        try:
            with open(path, "r", encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
        except OSError as e:
            return None, f"unreadable ({e.strerror or e})"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return None, "empty caption"
        if len(lines) > 1:
            return None, f"{len(lines)} non-empty lines (a caption file holds one line)"
        return lines[0], None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, caption_id = self.samples[index]
        image = load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, caption_id


def imagenet_class_names():
    """The 1000 English ImageNet class names in class-index order (util/imagenet_classes.txt)."""
    with open(IMAGENET_CLASSES_FILE, encoding="utf-8") as f:
        names = [line.rstrip("\n") for line in f]
    assert len(names) == 1000, IMAGENET_CLASSES_FILE
    return names


class ImageNetWithCaptions(ImageFolder):
    """ImageFolder over the 1000 ImageNet class folders (wnids such as n01440764, sorted = class index order),
    captioned by template.format(English class name): caption_id == class index, `.captions[i]` is class i's caption.

    The English names are torchvision's IMAGENET1K categories (util/imagenet_classes.txt; all 1000 are distinct).
    Any other layout (another class count, folders that are not wnids) is rejected: the names could not be matched.
    """

    def __init__(self, root, transform=None, template="{}の写真", **kwargs):
        super().__init__(root, transform=transform, **kwargs)
        if len(self.classes) != 1000:
            raise ValueError(f"ImageNetWithCaptions({root}): found {len(self.classes)} class folders, expected the "
                             f"1000 ImageNet class folders (wnids); use TextImageDataset for other data")
        not_wnids = [name for name in self.classes if not re.fullmatch(r"n\d{8}", name)]
        if not_wnids:
            raise ValueError(f"ImageNetWithCaptions({root}): class folders must be ImageNet wnids like n01440764, "
                             f"got {not_wnids[:5]}")
        self.template = template
        self.class_names = imagenet_class_names()
        self.captions = [template.format(name) for name in self.class_names]
