"""The demos' digits: scikit-learn's 1,797 handwritten 8 x 8 digits (shipped inside the package: no download), written
as 32 x 32 RGB PNGs, as an ImageFolder and as images/ + captions/ with Japanese and English captions."""
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CAPTION_JA = "手書きの数字{}"
CAPTION_EN = "a handwritten digit {}"
IMG_SIZE = 32
NUM_CLASSES = 10


def digit_image(pixels_8x8):
    """A scikit-learn digit (8 x 8 floats 0..16, 16 = ink) as a 32 x 32 RGB PIL image: dark ink on white."""
    gray = (255 - np.asarray(pixels_8x8, dtype=np.float64) / 16 * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((IMG_SIZE, IMG_SIZE), Image.BICUBIC).convert("RGB")


def caption_of(index, digit):
    """Captions alternate between Japanese (even index) and English (odd index)."""
    return (CAPTION_JA if index % 2 == 0 else CAPTION_EN).format(digit)


def materialise_digits(out_dir, per_class=None):
    """Write the digits as <out_dir>/digits/train/<digit>/digit_XXXX.png and <out_dir>/digits_captioned/{images,
    captions}/digit_XXXX.{png,txt}; per_class keeps only the first images of each digit. Idempotent: a folder
    holding a complete copy (marker file .complete with the image count) is left alone.
    Returns (imagefolder root, captioned root, number of images, written: bool)."""
    digits = load_digits()
    seen = [0] * NUM_CLASSES
    chosen = []
    for index, digit in enumerate(digits.target.tolist()):
        if per_class is None or seen[digit] < per_class:
            seen[digit] += 1
            chosen.append(index)
    folder_root = os.path.join(out_dir, "digits")
    captioned_root = os.path.join(out_dir, "digits_captioned")
    marker = f"{len(chosen)} images\n"
    markers = [os.path.join(root, ".complete") for root in (folder_root, captioned_root)]
    if all(os.path.isfile(m) and open(m).read() == marker for m in markers):
        return folder_root, captioned_root, len(chosen), False

    for digit in range(NUM_CLASSES):
        os.makedirs(os.path.join(folder_root, "train", str(digit)), exist_ok=True)
    os.makedirs(os.path.join(captioned_root, "images"), exist_ok=True)
    os.makedirs(os.path.join(captioned_root, "captions"), exist_ok=True)
    for index in chosen:
        digit = int(digits.target[index])
        image = digit_image(digits.images[index])
        stem = f"digit_{index:04d}"
        image.save(os.path.join(folder_root, "train", str(digit), stem + ".png"))
        image.save(os.path.join(captioned_root, "images", stem + ".png"))
        with open(os.path.join(captioned_root, "captions", stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption_of(index, digit) + "\n")
    for m in markers:
        with open(m, "w") as f:
            f.write(marker)
    return folder_root, captioned_root, len(chosen), True
