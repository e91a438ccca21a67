"""util.misc.atomic_write, the one way files are replaced: checkpoints, exported models, caption stores, shards,
converted LLM folders and Inception weights are written to a temporary beside their path, fsynced, then renamed."""
import os

import numpy as np
import pytest
from PIL import Image

from denoiser import Denoiser
from text_conditioning import CaptionLLM
from util.checkpoint import save_pretrained
from util.datasets import image_folder
from util.misc import atomic_write
from util.shards import write_shards
from util.text_store import build_store


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "value.txt"
    with atomic_write(str(path)) as tmp, open(tmp, "w") as f:
        f.write("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(str(path)) as tmp, open(tmp, "w") as f:
            f.write("new, partly")
            raise OSError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["value.txt"]
    with atomic_write(str(path)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["value.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """As util/llm writes a converted LLM folder: the old folder stays until the new one is complete."""
    out = tmp_path / "llm"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(out)) as tmp:
            os.makedirs(tmp)
            (tmp_path / os.path.basename(tmp) / "config.json").write_text("new")
            raise RuntimeError("conversion failed")
    assert (out / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["llm"]
    with atomic_write(str(out)) as tmp:
        os.makedirs(tmp)
        (tmp_path / os.path.basename(tmp) / "config.json").write_text("new")
        for name in os.listdir(out):  # a rename cannot replace a folder that holds files
            os.remove(out / name)
        os.rmdir(out)
    assert (out / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["llm"]


@pytest.fixture
def replacements(monkeypatch):
    """Every os.replace as (source, target, whether the source was fsynced before)."""
    synced, calls = set(), []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def recorded_replace(src, dst):
        calls.append((str(src), str(dst), os.path.realpath(src) in synced))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return calls


def assert_atomic(calls, folder, names):
    """Each named file of `folder` was written as <name>.tmp.<pid>, fsynced, then renamed over its name."""
    written = {os.path.basename(dst): (src, synced) for src, dst, synced in calls if os.path.dirname(dst) == folder}
    assert set(names) <= set(written), sorted(written)
    for name in names:
        src, synced = written[name]
        assert src == os.path.join(folder, f"{name}.tmp.{os.getpid()}") and synced, name


def test_exports_shards_and_caption_stores_are_written_atomically(make_args, tiny_llm_path, tmp_path, replacements):
    export = str(tmp_path / "export")
    save_pretrained(export, Denoiser(make_args()).state_dict(), {"format": "jit-denoiser"})
    assert_atomic(replacements, export, ["model.safetensors", "config.json"])

    for c in range(2):
        folder = tmp_path / "data" / "train" / f"c{c}"
        os.makedirs(folder)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 50 * c + i, np.uint8)).save(folder / f"{i}.png")
    shards = str(tmp_path / "shards")
    write_shards(image_folder(str(tmp_path / "data")), str(tmp_path / "data"), shards, 16, shard_size=4)
    assert_atomic(replacements, shards, ["jit_shards.partial.json", "shard-00000.npy", "shard-00000.json",
                                         "shard-00001.npy", "shard-00001.json", "labels.npy", "jit_shards.json"])

    store = build_store(CaptionLLM(tiny_llm_path), ["犬の写真", "a photo of a cat"], tmp_path / "store",
                        show_progress=False)
    shard_names = [name for name in os.listdir(store.folder) if name.endswith(".safetensors")]
    assert len(shard_names) == 1
    assert_atomic(replacements, store.folder, ["store.json", "index.json", *shard_names])
