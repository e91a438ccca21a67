"""ADM center crop (guided-diffusion's center_crop_arr), the training-time and reference-statistics crop of the JiT
release (github.com/LTH14/JiT)."""
from PIL import Image


def center_crop_arr(pil_image, image_size):
    """Halve with BOX while the short side >= 2 * image_size, resize the short side to image_size (BICUBIC),
    then take the central image_size x image_size crop. Smaller images are upscaled."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.size[0] - image_size) // 2
    top = (pil_image.size[1] - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))
