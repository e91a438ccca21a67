"""Write the training crops once as uint8 shards that main_jit.py trains from (util/shards.py describes the folder).

    python prepare_data.py --data_path ./data/imagenet --img_size 256 --out ./data/imagenet_256_shards
    python main_jit.py --data_path ./data/imagenet_256_shards --img_size 256 ...   # detected from jit_shards.json

Images are indexed as main_jit.py indexes them (torchvision ImageFolder of <data_path>/train) and cropped with its
training transform (ADM center crop, uint8), so training from the shards gives the same batches as from the JPEGs.
Resumable: a killed run keeps its completed shards and continues with the next one. An unreadable image stops
the run naming it (--on_bad_data error) or is left out with a warning (skip), as --check_data does in main_jit.py.
"""
import argparse

from util.datasets import image_folder
from util.misc import available_cpus
from util.shards import write_shards


def get_args_parser():
    parser = argparse.ArgumentParser("JiT pre-cropped shards", description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root holding train/<class>/")
    parser.add_argument("--out", required=True, help="output folder of the shards")
    parser.add_argument("--img_size", default=256, type=int, help="side of the center crop (the training --img_size)")
    parser.add_argument("--shard_size", default=2048, type=int,
                        help="images per shard file (2048: 0.4 GB at 256 px, 1.6 GB at 512 px)")
    parser.add_argument("--num_workers", default=available_cpus(), type=int,
                        help="decoding processes (default: the CPUs this process may use)")
    parser.add_argument("--on_bad_data", default="error", choices=["error", "skip"],
                        help="an unreadable image: stop naming it, or leave it out with a warning")
    return parser


def main(args):
    try:
        write_shards(image_folder(args.data_path), args.data_path, args.out, args.img_size, args.shard_size,
                     args.on_bad_data, args.num_workers)
    except ValueError as e:
        raise SystemExit(f"prepare_data.py: {e}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
