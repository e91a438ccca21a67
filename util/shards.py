"""Pre-cropped training data: the ADM center crops written once as uint8 shards by prepare_data.py and read
memory-mapped, so training does not decode and resize every JPEG at every epoch (see README, Loader throughput).

A shard folder holds:
  jit_shards.json       img_size, class names, the shard files with their image counts
  jit_shards.partial.json  the job it is written by (source, img_size, shard_size, ...): a rerun must match it
  shard-00000.npy ...   uint8 (count, 3, S, S): exactly the tensors the ImageFolder path ships (train_transform)
  shard-00000.json ...  labels and source paths of the shard's images (what prepare_data.py resumes from)
  labels.npy            int64 label of every image, in shard order
The images are in ImageFolder order, so the same sampler draws the same images as from the JPEG folder and the
batches are bit-identical (the random flip happens on the device, from the training RNG, on both paths).
"""
import bisect
import json
import os
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from util.data import load_rgb, train_transform, unreadable_message
from util.misc import atomic_write, progress_bar, write_json

INDEX_NAME = "jit_shards.json"
JOB_NAME = "jit_shards.partial.json"


def is_shard_folder(path):
    return os.path.isfile(os.path.join(path, INDEX_NAME))


def shard_name(index):
    return f"shard-{index:05d}"


class ShardDataset(Dataset):
    """(uint8 (3, S, S) tensor, label) pairs of a prepare_data.py folder, like util/data.ImageSamples."""

    def __init__(self, root, img_size=None):
        """img_size: the crop side the caller needs; the folder holding another is an error (the one check of it)."""
        try:
            with open(os.path.join(root, INDEX_NAME), encoding="utf-8") as f:
                index = json.load(f)
            self.labels = np.load(os.path.join(root, "labels.npy"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{root}: unreadable shard index ({e}); rerun prepare_data.py") from None
        self.img_size, self.classes = index["img_size"], index["classes"]
        if img_size is not None and img_size != self.img_size:
            raise ValueError(f"{root} holds {self.img_size} px crops, not the --img_size {img_size} asked for "
                             f"(prepare_data.py --img_size)")
        self.files = [os.path.join(root, shard["file"]) for shard in index["shards"]]
        self.offsets = np.cumsum([0] + [shard["count"] for shard in index["shards"]]).tolist()
        if self.offsets[-1] != len(self.labels):
            raise ValueError(f"{root}: the shards hold {self.offsets[-1]} images but labels.npy {len(self.labels)}")
        self.arrays = None  # memory-mapped on first use in each process (a pickled memmap would be copied)

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        return dict(self.__dict__, arrays=None)

    def __getitem__(self, index):
        if self.arrays is None:
            self.arrays = [np.load(path, mmap_mode="r") for path in self.files]
        shard = bisect.bisect_right(self.offsets, index) - 1
        # a copy: the map is read-only, and the batch must not keep the page cache pinned
        image = torch.from_numpy(np.array(self.arrays[shard][index - self.offsets[shard]]))
        return image, int(self.labels[index])


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


def write_shard(out, index, crops, img_size, on_bad, num_workers, bar):
    """Decode, crop and write one shard: <name>.npy, then <name>.json (its presence marks the shard complete)."""
    name = shard_name(index)
    shape = (len(crops), 3, img_size, img_size)
    kept, skipped = [], []
    with atomic_write(os.path.join(out, f"{name}.npy")) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for batch in DataLoader(crops, batch_size=32, num_workers=num_workers, collate_fn=list):
            for i, image, problem in batch:
                if problem is not None:
                    if on_bad == "error":
                        raise ValueError(f"{problem}; fix or remove it, or pass --on_bad_data skip")
                    warnings.warn(f"{problem}; skipped")
                    skipped.append(crops.samples[i][0])
                    continue
                array[len(kept)] = image
                kept.append(i)
            bar.update(len(batch))
        if skipped:  # rare: the shard rewritten with its true length
            short = np.lib.format.open_memmap(f"{tmp}.short", mode="w+", dtype=np.uint8,
                                              shape=(len(kept),) + shape[1:])
            short[:] = array[:len(kept)]
            short.flush()
            del short
            os.replace(f"{tmp}.short", tmp)
        array.flush()
        del array
    write_json(os.path.join(out, f"{name}.json"), {
        "count": len(kept), "labels": [crops.samples[i][1] for i in kept],
        "paths": [crops.samples[i][0] for i in kept], "skipped": skipped})


def write_shards(folder, data_path, out, img_size, shard_size=2048, on_bad="error", num_workers=0):
    """The ADM crops of `folder` (data_path's ImageFolder) written into `out` as shards, resuming a killed run;
    ValueError for an unreadable image (on_bad "error") or an `out` holding another job's shards."""
    samples = folder.samples
    os.makedirs(out, exist_ok=True)
    job = {"data_path": os.path.abspath(data_path), "img_size": img_size, "shard_size": shard_size,
           "num_samples": len(samples), "classes": folder.classes}
    job_file = os.path.join(out, JOB_NAME)
    if os.path.isfile(job_file):
        with open(job_file, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != job:
            changed = [key for key in job if previous.get(key) != job[key]]
            raise ValueError(f"--out {out} holds shards of another job (different {', '.join(changed)}); use "
                             f"another --out or delete it")
    else:
        write_json(job_file, job)

    num_shards = (len(samples) + shard_size - 1) // shard_size
    done = [i for i in range(num_shards) if os.path.isfile(os.path.join(out, f"{shard_name(i)}.json"))]
    print(f"{len(samples)} images of {len(folder.classes)} classes from {folder.root} -> {num_shards} shards of "
          f"{img_size} px crops in {out}" + (f" ({len(done)} already written)" if done else ""))
    with progress_bar(total=len(samples), unit="img", initial=min(len(done) * shard_size, len(samples))) as bar:
        for i in range(num_shards):
            if i not in done:
                crops = Crops(samples[i * shard_size:(i + 1) * shard_size], img_size)
                write_shard(out, i, crops, img_size, on_bad, num_workers, bar)

    shards, labels, skipped = [], [], []
    for i in range(num_shards):
        with open(os.path.join(out, f"{shard_name(i)}.json"), encoding="utf-8") as f:
            meta = json.load(f)
        shards.append({"file": f"{shard_name(i)}.npy", "count": meta["count"]})
        labels += meta["labels"]
        skipped += meta["skipped"]
    with atomic_write(os.path.join(out, "labels.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    write_json(os.path.join(out, INDEX_NAME), {
        "img_size": img_size, "layout": "uint8 (N, 3, S, S)", "classes": folder.classes, "source": job["data_path"],
        "shards": shards})
    size = sum(os.path.getsize(os.path.join(out, s["file"])) for s in shards)
    print(f"wrote {len(labels)} crops ({size / max(len(labels), 1) / 1024:.0f} KiB per image, {size / 2 ** 30:.2f} GiB)"
          + (f"; left out {len(skipped)} unreadable image(s)" if skipped else ""))
