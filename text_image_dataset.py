"""Caption-conditioned data sets for text-to-image training (an extension: the JiT release is class-conditional).

Each is an index: `.samples` the (image path, caption_id) pairs that util/data.ImageSamples loads, as it does an
ImageFolder's, and `.captions` the captions caption_id indexes. Each caption is embedded once by the frozen LLM into
the caption feature store (util/text_store.py), whose rows the model looks up by caption_id like a class label.
Images are decoded by util/data.load_rgb, the decoder of every data path (transparency over white, 16-bit
rescaled), when the training loader reads a sample.
"""
import collections
import os
import re
import unicodedata
import warnings

from torchvision.datasets import ImageFolder

from util.data import IMAGE_EXTENSIONS, index_captions

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "util", "imagenet_classes.txt")
CAPTION_EXTENSION = ".txt"  # matched in any case (.TXT)
IMAGENET_CAPTION = "{}の写真"  # "a photo of <English class name>" in Japanese


def find_files(folder, extensions):
    """Sorted paths relative to folder ('/'-separated) of the files under it, searched recursively (following
    links), whose name ends with one of extensions in any case."""
    found = []
    for parent, _, names in os.walk(folder, followlinks=True):
        found += [os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
                  for name in names if name.lower().endswith(extensions)]
    return sorted(found)


def match_key(relative_path):
    """What pairs an image with its caption file: the relative path without extension, in NFC (macOS writes
    decomposed names) and case-folded, as a case-insensitive disk (Windows, macOS) would compare the names."""
    return unicodedata.normalize("NFC", os.path.splitext(relative_path)[0]).casefold()


class TextImageDataset:
    """Images `<root>/images/**/<name>.<ext>` (util/data.IMAGE_EXTENSIONS, any case, in sub-folders too) captioned
    by `<root>/captions/**/<name>.txt` at the same relative path (`images/x/a.jpg` <-> `captions/x/a.txt`).

    Names match ignoring letter case and Unicode normalisation (`B.jpg` <-> `b.TXT`); two images whose names differ
    only in extension or case (`a.jpg`, `a.png`) would share one caption file and are an error naming both, as are
    two caption files differing only in case. A caption file holds one UTF-8 line (a BOM and surrounding whitespace
    are stripped). Problems found when the dataset is built: an image without caption file, an empty caption, a
    caption file that cannot be read or is not UTF-8 or has more than one non-empty line, a caption file without
    image, the name clashes above. on_bad='error' (default) raises a ValueError: one line naming the path(s) for one
    problem, else a summary line and one line per problem; on_bad='skip' warns once with the count and the paths,
    and drops those samples. The images themselves are not opened here. Samples are in sorted relative-path order;
    `.captions` are the distinct captions in order of first appearance, `.samples` the (image path, caption_id) pairs.
    """

    def __init__(self, root, on_bad="error"):
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        root = str(root)
        image_dir = os.path.join(root, "images")
        caption_dir = os.path.join(root, "captions")
        for folder in (image_dir, caption_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"TextImageDataset: {folder} is not a folder "
                                        f"(expected {root}/images/*.jpg|png|... and {root}/captions/*.txt)")

        images = collections.defaultdict(list)  # match key -> relative paths, each in sorted order
        for relative in find_files(image_dir, IMAGE_EXTENSIONS):
            images[match_key(relative)].append(relative)
        caption_files = collections.defaultdict(list)
        for relative in find_files(caption_dir, (CAPTION_EXTENSION,)):
            caption_files[match_key(relative)].append(relative)

        def image_file(relative):
            return os.path.join(image_dir, *relative.split("/"))

        def caption_file(relative):
            return os.path.join(caption_dir, *relative.split("/"))

        problems = []  # (path, reason)
        samples = []  # (image path, caption text)
        for key in sorted(images, key=lambda k: images[k][0]):
            names, captions_of_key = images[key], caption_files.get(key, [])
            if len(names) > 1:
                caption = captions_of_key[0] if captions_of_key else os.path.splitext(names[0])[0] + ".txt"
                problems.append((image_file(names[0]), f"{' and '.join(image_file(n) for n in names[1:])} "
                                 f"would share its caption file {caption_file(caption)} (same name apart from "
                                 f"extension or letter case); rename one"))
                continue
            if not captions_of_key:
                stem = os.path.splitext(names[0])[0]
                problems.append((image_file(names[0]), f"no caption file {caption_file(stem + CAPTION_EXTENSION)}"))
                continue
            if len(captions_of_key) > 1:
                problems.append((caption_file(captions_of_key[0]),
                                 f"{' and '.join(caption_file(c) for c in captions_of_key[1:])} also caption "
                                 f"{image_file(names[0])} (names differ only in letter case); keep one"))
                continue
            caption, reason = self._read_caption(caption_file(captions_of_key[0]))
            if reason is not None:
                problems.append((caption_file(captions_of_key[0]), f"{reason} (caption of {image_file(names[0])})"))
                continue
            samples.append((image_file(names[0]), caption))
        extensions = "|".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        for key in sorted(set(caption_files) - set(images), key=lambda k: caption_files[k][0]):
            for relative in caption_files[key]:
                stem = os.path.splitext(relative)[0]
                problems.append((caption_file(relative), f"caption file without image (no {stem}.{extensions} in "
                                                         f"{image_dir})"))

        if problems:
            lines = [f"  {path}: {reason}" for path, reason in problems]
            if on_bad == "error" and len(problems) == 1:  # one line naming the file
                raise ValueError(f"TextImageDataset({root}): {lines[0].strip()}; fix it or pass on_bad='skip'")
            if on_bad == "error":
                raise ValueError("\n".join([f"TextImageDataset({root}): {len(problems)} problem(s) in the "
                                            f"data; fix them or pass on_bad='skip' to drop those samples"] + lines))
            warnings.warn("\n".join([f"TextImageDataset({root}): skipping {len(problems)} problem(s); "
                                     f"{len(samples)} samples kept"] + lines), stacklevel=2)
        if not samples:
            raise ValueError(f"TextImageDataset({root}): no usable image/caption pairs")

        self.captions, self.samples = index_captions(samples)

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


def imagenet_class_names():
    """The 1000 English ImageNet class names in class-index order (util/imagenet_classes.txt)."""
    with open(IMAGENET_CLASSES_FILE, encoding="utf-8") as f:
        names = [line.rstrip("\n") for line in f]
    assert len(names) == 1000, IMAGENET_CLASSES_FILE
    return names


class ImageNetWithCaptions(ImageFolder):
    """ImageFolder over the 1000 ImageNet class folders (wnids such as n01440764, sorted = class index order),
    captioned "<English class name>の写真" (IMAGENET_CAPTION): caption_id == class index, `.captions[i]` is class i's
    caption.

    The English names are torchvision's IMAGENET1K categories (util/imagenet_classes.txt; all 1000 are distinct).
    Any other layout (another class count, folders that are not wnids) is rejected: the names could not be matched.
    """

    def __init__(self, root):
        super().__init__(root)
        if len(self.classes) != 1000:
            raise ValueError(f"ImageNetWithCaptions({root}): found {len(self.classes)} class folders, expected the "
                             f"1000 ImageNet class folders (wnids); use TextImageDataset for other data")
        not_wnids = [name for name in self.classes if not re.fullmatch(r"n\d{8}", name)]
        if not_wnids:
            raise ValueError(f"ImageNetWithCaptions({root}): class folders must be ImageNet wnids like n01440764, "
                             f"got {not_wnids[:5]}")
        self.captions = [IMAGENET_CAPTION.format(name) for name in imagenet_class_names()]
