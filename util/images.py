"""Image output: generated [-1, 1] images as uint8, PNG files and their names, sample grids and prompt lists."""
import os

import torch
from torchvision.utils import save_image


def to_uint8(images):
    """[-1, 1] float images -> uint8, clip((x + 1) / 2 * 255) rounded, as the release saves its PNGs."""
    return ((images.float() + 1) / 2 * 255).clamp_(0, 255).round_().to(torch.uint8)


def png_name(index, label, text, digits=6):
    """File name of generated image `index`: by class label, or for -Text models by its prompt's index."""
    return f"{index:0{digits}d}_{'prompt' if text else 'class'}{label}.png"


def save_png(image, path):
    """One uint8 (3, H, W) image as a PNG file."""
    save_image(image.float() / 255, path)


def save_prompt_list(folder, names, prompts):
    """`<folder>/prompts.txt`: `<png name>: <prompt>`, one line per image of a folder of -Text samples."""
    with open(os.path.join(folder, "prompts.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{name}: {prompt}\n" for name, prompt in zip(names, prompts))


def save_grid(images, path, captions=None, nrow=8):
    """nrow-column PNG grid of uint8 images; for -Text models also `<path>.txt` with the prompt of every cell."""
    save_image(images.float() / 255, path, nrow=nrow)
    if captions is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.writelines(f"row {i // nrow} col {i % nrow}: {caption}\n" for i, caption in enumerate(captions))
