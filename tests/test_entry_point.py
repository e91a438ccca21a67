"""main_jit.py as a new user meets it: an unreadable image stops with its one-line message (no traceback), a
SIGTERM during start-up exits with the documented requeue status, and evaluation prints no training LR."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from util import fid
from util.preemption import PREEMPTED_EXIT_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def folder_with_bad_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for i in range(4):
            Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(root / "train" / c / f"{i}.png")
    (root / "train" / "b" / "2.png").write_bytes(b"\x89PNG truncated")  # found only when the loader reads it
    return root


def main_jit(*argv, **kwargs):
    return subprocess.run([sys.executable, "main_jit.py", *TINY, *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_during_training_stops_with_one_line(folder_with_bad_image, tmp_path, num_workers):
    result = main_jit("--data_path", folder_with_bad_image, "--output_dir", tmp_path, "--batch_size", "8",
                      "--epochs", "1", "--num_workers", num_workers)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    bad = folder_with_bad_image / "train" / "b" / "2.png"
    assert result.stderr.strip().splitlines()[-1].startswith(f"{bad}: unreadable image (")
    assert result.stderr.strip().endswith("; fix or remove it, or pass --on_bad_data skip")


def caught_signals(pid):
    """The set of signals a process has a handler for (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_during_startup_exits_with_the_requeue_status(folder_with_bad_image, tmp_path):
    proc = subprocess.Popen([sys.executable, "main_jit.py", *TINY, "--data_path", str(folder_with_bad_image),
                             "--output_dir", str(tmp_path), "--num_workers", "0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while 15 not in caught_signals(proc.pid) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.terminate()  # SIGTERM, as soon as anything handles it: still importing torch
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert "received SIGTERM during start-up" in output and "training images" not in output


def test_evaluate_gen_prints_no_training_learning_rate(tmp_path):
    stats = tmp_path / "stats.npz"
    fid.save_stats(str(stats), {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    weights = fid.convert_fid_helper_weights(str(tmp_path / "cache"))
    result = main_jit("--evaluate_gen", "--output_dir", tmp_path / "eval", "--fid_stats", stats, "--num_images", "2",
                      "--gen_bsz", "2", "--num_sampling_steps", "1", "--sampling_method", "euler",
                      "--inception_weights", weights)
    assert result.returncode == 0, result.stderr
    assert "FID" in result.stdout
    assert "effective batch" not in result.stdout + result.stderr and "lr " not in result.stdout



def test_default_device_has_one_home(monkeypatch):
    """sample.py, bench.py, demo.py and prepare_ref.py leave --device unset -> util/misc.default_device, checked by
    resolve_device with a one-line error naming the flag."""
    import torch

    from util import misc
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert misc.default_device() == "cpu" and misc.resolve_device(None) == torch.device("cpu")
    with pytest.raises(SystemExit, match="^--device cuda:1: CUDA is not available on this machine; use --device cpu$"):
        misc.resolve_device("cuda:1")
    with pytest.raises(SystemExit, match="^--device tpu: expected cpu, cuda or mps$"):
        misc.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert misc.default_device() == "cuda"
