"""Write the training crops once as uint8 shards that main_jit.py trains from (util/shards.py describes the folder).

    python prepare_data.py --data_path ./data/imagenet --img_size 256 --out ./data/imagenet_256_shards
    python main_jit.py --data_path ./data/imagenet_256_shards --img_size 256 ...   # detected from jit_shards.json

Images are indexed as main_jit.py indexes them (torchvision ImageFolder of <data_path>/train) and cropped with its
training transform (ADM center crop, uint8), so training from the shards gives the same batches as from the JPEGs.
Resumable: a killed run keeps its completed shards and continues with the next one. An unreadable image stops
the run naming it (--on_bad_data error) or is left out with a warning (skip), as --check_data does in main_jit.py.
"""
import argparse
import json
import os
import warnings

import numpy as np
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from util.data import load_rgb, train_transform, unreadable_message
from util.misc import available_cpus
from util.misc import progress as progress_bar
from util.shards import INDEX_NAME, shard_name

PROGRESS_NAME = "jit_shards.partial.json"


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


class Crops(Dataset):
    """(index, uint8 (3, S, S) array or None, problem or None) of each sample."""

    def __init__(self, samples, img_size):
        self.samples, self.transform = samples, train_transform(img_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path = self.samples[index][0]
        try:
            return index, self.transform(load_rgb(path)).numpy(), None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            return index, None, unreadable_message(path, e)


def write_json(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def write_shard(out, index, crops, img_size, on_bad, num_workers, bar):
    """Decode, crop and write one shard: <name>.npy, then <name>.json (its presence marks the shard complete)."""
    name = shard_name(index)
    tmp = os.path.join(out, f"{name}.tmp.npy")
    shape = (len(crops), 3, img_size, img_size)
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    kept, skipped = [], []
    loader = DataLoader(crops, batch_size=32, num_workers=num_workers, collate_fn=list)
    for batch in loader:
        for i, image, problem in batch:
            if problem is not None:
                if on_bad == "error":
                    raise SystemExit(f"prepare_data.py: {problem}; fix or remove it, or pass --on_bad_data skip")
                warnings.warn(f"{problem}; skipped")
                skipped.append(crops.samples[i][0])
                continue
            array[len(kept)] = image
            kept.append(i)
        bar.update(len(batch))
    if skipped:  # rare: rewrite the shard with its true length
        full, tmp_full = array, tmp
        tmp = os.path.join(out, f"{name}.tmp2.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(kept),) + shape[1:])
        array[:] = full[:len(kept)]
        del full
        os.remove(tmp_full)
    array.flush()
    del array
    os.replace(tmp, os.path.join(out, f"{name}.npy"))
    write_json(os.path.join(out, f"{name}.json"), {
        "count": len(kept), "labels": [crops.samples[i][1] for i in kept],
        "paths": [crops.samples[i][0] for i in kept], "skipped": skipped})


def main(args):
    train_dir = os.path.join(args.data_path, "train")
    try:
        folder = datasets.ImageFolder(train_dir)  # the index main_jit.build_dataset uses: same order, same labels
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"prepare_data.py: --data_path {args.data_path}: {e}")
    samples = folder.samples
    os.makedirs(args.out, exist_ok=True)
    job = {"data_path": os.path.abspath(args.data_path), "img_size": args.img_size, "shard_size": args.shard_size,
           "num_samples": len(samples), "classes": folder.classes}
    progress = os.path.join(args.out, PROGRESS_NAME)
    if os.path.isfile(progress):
        with open(progress) as f:
            previous = json.load(f)
        if previous != job:
            changed = [key for key in job if previous.get(key) != job[key]]
            raise SystemExit(f"prepare_data.py: --out {args.out} holds shards of another job (different "
                             f"{', '.join(changed)}); use another --out or delete it")
    else:
        write_json(progress, job)

    num_shards = (len(samples) + args.shard_size - 1) // args.shard_size
    done = [i for i in range(num_shards) if os.path.isfile(os.path.join(args.out, f"{shard_name(i)}.json"))]
    print(f"{len(samples)} images of {len(folder.classes)} classes from {train_dir} -> {num_shards} shards of "
          f"{args.img_size} px crops in {args.out}" + (f" ({len(done)} already written)" if done else ""))
    with progress_bar(total=len(samples), unit="img", initial=min(len(done) * args.shard_size, len(samples))) as bar:
        for i in range(num_shards):
            if i not in done:
                crops = Crops(samples[i * args.shard_size:(i + 1) * args.shard_size], args.img_size)
                write_shard(args.out, i, crops, args.img_size, args.on_bad_data, args.num_workers, bar)

    shards, labels, skipped = [], [], []
    for i in range(num_shards):
        with open(os.path.join(args.out, f"{shard_name(i)}.json")) as f:
            meta = json.load(f)
        shards.append({"file": f"{shard_name(i)}.npy", "count": meta["count"]})
        labels += meta["labels"]
        skipped += meta["skipped"]
    np.save(os.path.join(args.out, "labels.npy"), np.asarray(labels, dtype=np.int64))
    write_json(os.path.join(args.out, INDEX_NAME), {
        "img_size": args.img_size, "layout": "uint8 (N, 3, S, S)", "classes": folder.classes,
        "source": job["data_path"], "shards": shards})
    size = sum(os.path.getsize(os.path.join(args.out, s["file"])) for s in shards)
    print(f"wrote {len(labels)} crops ({size / max(len(labels), 1) / 1024:.0f} KiB per image, {size / 2 ** 30:.2f} GiB)"
          + (f"; left out {len(skipped)} unreadable image(s)" if skipped else ""))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
