"""Weights & Biases beside TensorBoard (util/tracking.RunLog): a real offline W&B run (no network) read back from the
file it writes: the run's flags as config, the same scalars as TensorBoard on their axes, every evaluation's grid,
and a resumed run continuing the same W&B run."""
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from util import fid
from util.stages import read_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]


def wandb_records(run_dir):
    """The protobuf records of an offline run's run-<id>.wandb: W&B's transaction log, LevelDB's log format (32 KiB
    blocks of chunks: crc32 4 bytes, length 2, type 1 = full, 2 = first, 3 = middle, 4 = last) after a 7-byte
    header. Read here to check what the run wrote; W&B itself has no reader of its own files in Python."""
    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(records):
    """[{key: value}] of the run's wandb.log calls."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandbdata")
    rng = np.random.default_rng(4)
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(root / "train" / c / f"{i}.png")
    stats = root / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    return root, stats


def train(data, out, epochs):
    root, stats = data
    result = subprocess.run(
        [sys.executable, "main_jit.py", *TINY, "--data_path", str(root), "--output_dir", str(out), "--resume", str(out),
         "--epochs", str(epochs), "--batch_size", "4", "--num_workers", "0", "--log_freq", "1", "--val_fraction",
         "0.2", "--online_eval", "--eval_freq", "1", "--fid_stats", str(stats), "--num_images", "2", "--gen_bsz", "2",
         "--num_sampling_steps", "1", "--sampling_method", "euler", "--wandb_project", "jit-test", "--wandb_name",
         "tiny", "--wandb_mode", "offline"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, WANDB_SILENT="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    return runs[-1], result.stdout


@pytest.mark.slow  # two short training runs with evaluation, in subprocesses
def test_wandb_gets_tensorboards_scalars_the_flags_and_the_grids_and_a_resume_continues_it(data, tmp_path):
    out = tmp_path / "run"
    first, _ = train(data, out, 1)
    records = wandb_records(first)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (run.project, run.display_name, config["model"], config["epochs"], config["lr"]) == (
        "jit-test", "tiny", "JiT-T/4", 1, 5e-5 * 4 / 256)  # the resolved lr: blr * batch / 256
    rows = history(records)
    for tag in ("train_loss", "lr", "val_loss"):  # the step axis: TensorBoard's (global step, value) pairs
        logged = [(row["step"], row[tag]) for row in rows if tag in row]
        assert logged == [(step, pytest.approx(value, rel=1e-6)) for step, value in read_scalars(str(out), tag)], tag
    fids = [(row["epoch"], row["fid_cfg1_ema1"]) for row in rows if "fid_cfg1_ema1" in row]
    assert fids == [(0, pytest.approx(read_scalars(str(out), "fid_cfg1_ema1")[0][1], rel=1e-6))]
    grids = [row for row in rows if "samples_cfg1_ema1/path" in row]
    assert len(grids) == 1 and grids[0]["epoch"] == 0 and grids[0]["samples_cfg1_ema1/caption"].startswith("epoch 0")
    assert os.path.isfile(os.path.join(first, "files", grids[0]["samples_cfg1_ema1/path"]))

    second, log = train(data, out, 2)  # --resume: the same W&B run continues
    assert second != first
    resumed = next(r.run for r in wandb_records(second) if r.WhichOneof("record_type") == "run")
    assert resumed.run_id == run.run_id
    assert [row["epoch"] for row in history(wandb_records(second)) if "fid_cfg1_ema1" in row] == [1]


def test_wandb_flag_without_the_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from util.args import check_config, get_args_parser
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    args = get_args_parser().parse_args(TINY + ["--wandb_project", "p", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^--wandb_project p: Weights & Biases is not installed; pip install "
                                         r"wandb==0\.31\.0$"):
        check_config(args)
