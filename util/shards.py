"""Pre-cropped training data: the ADM center crops written once as uint8 shards by prepare_data.py and read
memory-mapped, so training no longer decodes and resizes every JPEG at every epoch (see README, Loader throughput).

A shard folder holds:
  jit_shards.json       img_size, class names, the shard files with their image counts
  shard-00000.npy ...   uint8 (count, 3, S, S): exactly the tensors the ImageFolder path ships (util/data.train_transform)
  shard-00000.json ...  labels and source paths of the shard's images (what prepare_data.py resumes from)
  labels.npy            int64 label of every image, in shard order
The images are in ImageFolder order, so the same sampler draws the same images as from the JPEG folder and the
batches are bit-identical (the random flip happens on the device, from the training RNG, on both paths).
"""
import bisect
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

INDEX_NAME = "jit_shards.json"


def is_shard_folder(path):
    return os.path.isfile(os.path.join(path, INDEX_NAME))


def shard_name(index):
    return f"shard-{index:05d}"


class ShardDataset(Dataset):
    """(uint8 (3, S, S) tensor, label) pairs of a prepare_data.py folder, like util/data.ImageSamples."""

    def __init__(self, root, img_size=None):
        """img_size: the crop side the caller needs; the folder holding another is an error (the one check of it)."""
        try:
            with open(os.path.join(root, INDEX_NAME)) as f:
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
