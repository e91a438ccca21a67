"""What a run decides before any work: which checkpoint it continues (rank 0 decides, every rank follows or all stop
with one line), never writing over another run's checkpoints, evaluation that follows --seed, and nodes that do not
share a disk (simulated by one working folder per rank)."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

import main_jit
import util.misc as misc
from conftest import perturb_, run_main_in_process
from denoiser import Denoiser
from util import fid
from util.checkpoint import load_checkpoint, read_checkpoint, rng_state, save_checkpoint
from util.images import to_uint8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main_jit.py")
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """<root>/train/{a,b}/*.png: 4 random 32 x 32 images per class."""
    root = tmp_path_factory.mktemp("startdata")
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


def parse(*argv):
    return main_jit.get_args_parser().parse_args(TINY + [str(a) for a in argv])


def write_checkpoint(folder, epoch=1, step=0, seed=0, rng_seed=None):
    """A checkpoint of a tiny model (weights from `seed`, perturbed so that it draws more than gray) in folder, as a
    run saves it to continue at (epoch + 1, 0) or mid-epoch at (epoch, step); its saved RNG state is drawn from
    rng_seed."""
    os.makedirs(folder, exist_ok=True)
    args = parse()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = perturb_(Denoiser(args), seed=seed)
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        state = {"epoch": epoch + 1 if step == 0 else epoch, "step": step, "rng": [rng_state()]}
    path = os.path.join(folder, "checkpoint-last.pth")
    save_checkpoint(path, model, misc.build_optimizer(model, 1e-4, 0.0, torch.device("cpu")),
                    epoch if step == 0 else epoch - 1, args, state)
    return path


def run_main(argv, monkeypatch):
    return run_main_in_process(parse(*argv), monkeypatch)


def folder_state(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


# ------------------------------------------------------------------ nothing a user has is overwritten
def test_fresh_run_into_a_folder_with_a_checkpoint_stops_before_any_work(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_checkpoint(out, epoch=1)
    (out / "checkpoint-100.pth").write_bytes((out / "checkpoint-last.pth").read_bytes())
    before = folder_state(out)
    with pytest.raises(SystemExit) as info:
        run_main(["--data_path", image_folder, "--output_dir", out, "--epochs", 1], monkeypatch)
    assert str(info.value) == (f"--output_dir {out} already holds checkpoint-last.pth (saved at epoch 2 step 0): "
                               f"pass --resume {out} to continue that run, or choose another --output_dir")
    other = write_checkpoint(tmp_path / "other", epoch=3, step=1)
    with pytest.raises(SystemExit) as info:
        run_main(["--data_path", image_folder, "--output_dir", out, "--resume", other, "--epochs", 5], monkeypatch)
    assert str(info.value) == (f"--output_dir {out} already holds checkpoint-last.pth (saved at epoch 2 step 0), "
                               f"which this run, resuming {other}, would replace: choose another --output_dir")
    assert folder_state(out) == before  # not a byte written: no event file, no temporary, no checkpoint
    (out / "checkpoint-last.pth").unlink()  # a numbered checkpoint alone is protected too
    with pytest.raises(SystemExit, match=r"already holds checkpoint-100.pth \(saved at epoch 2 step 0\)"):
        run_main(["--data_path", image_folder, "--output_dir", out, "--epochs", 1], monkeypatch)


def test_output_dir_that_is_also_resume_starts_fresh_then_continues(image_folder, tmp_path, monkeypatch, capsys):
    """The release's recipe (--output_dir X --resume X): a fresh start while X is empty, a resume after."""
    out = tmp_path / "run"
    common = ["--data_path", image_folder, "--output_dir", out, "--resume", out, "--batch_size", 4, "--num_workers", 0]
    run_main(common + ["--epochs", 1], monkeypatch)
    assert read_checkpoint(out / "checkpoint-last.pth")["epoch"] == 0
    run_main(common + ["--epochs", 2], monkeypatch)
    assert f"resumed from {out}/checkpoint-last.pth (epoch 0); continuing at epoch 1 step 0" in capsys.readouterr().out
    assert read_checkpoint(out / "checkpoint-last.pth")["epoch"] == 1


# ------------------------------------------------------------------ evaluation
@pytest.fixture
def eval_flags(tmp_path):
    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    return ["--evaluate_gen", "--fid_stats", stats, "--num_images", 2, "--gen_bsz", 2, "--num_sampling_steps", 2,
            "--sampling_method", "euler", "--save_png", "--eval_ema", 0]


def test_evaluate_gen_with_a_resume_folder_without_checkpoint_stops(tmp_path, eval_flags, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        run_main([*eval_flags, "--resume", empty, "--output_dir", tmp_path / "eval"], monkeypatch)
    assert str(info.value) == (f"--resume {empty}: no checkpoint-last.pth there, nothing to evaluate (without "
                               f"--resume, --evaluate_gen evaluates the initial weights of --seed)")


def test_evaluate_gen_follows_seed_not_the_training_rng_of_the_checkpoint(tmp_path, eval_flags, monkeypatch):
    """Two checkpoints with the same weights and different saved RNG states give the same samples for one --seed
    (the release re-seeds every rank with seed + rank before evaluating); another --seed gives others."""
    def samples(checkpoint_folder, seed):
        out = tmp_path / f"eval_{os.path.basename(checkpoint_folder)}_{seed}"
        run_main([*eval_flags, "--resume", checkpoint_folder, "--output_dir", out, "--seed", seed], monkeypatch)
        folder = out / "images_epoch1_cfg1_ema0"
        return [np.asarray(Image.open(folder / name)) for name in sorted(os.listdir(folder))]

    write_checkpoint(tmp_path / "a", rng_seed=1)
    write_checkpoint(tmp_path / "b", rng_seed=2)
    first = samples(tmp_path / "a", 5)
    model = Denoiser(parse("--num_sampling_steps", 2, "--sampling_method", "euler")).eval()
    path = tmp_path / "a" / "checkpoint-last.pth"
    load_checkpoint(model, path, read_checkpoint(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)  # what the release does right before evaluating: seed + rank
        expected = to_uint8(model.generate(torch.tensor([0, 1]))).permute(0, 2, 3, 1).numpy()
    assert len(first) == 2 and all(np.array_equal(x, y) for x, y in zip(first, expected))
    assert all(np.array_equal(x, y) for x, y in zip(first, samples(tmp_path / "b", 5)))
    assert not np.array_equal(first[0], samples(tmp_path / "a", 6)[0])


# ------------------------------------------------------------------ two ranks, one folder each ("two nodes")
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(argv, cwds, envs=({}, {}), timeout=300):
    """main_jit.py as two gloo ranks started with the variables torchrun sets, each in its own working folder (a node
    whose disk the other does not see). Returns [(exit status, output)] per rank."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1", **envs[rank])
        procs.append(subprocess.Popen([sys.executable, MAIN, *TINY, *map(str, argv)], cwd=cwds[rank], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(proc.wait(timeout=timeout), proc.communicate()[0]) for proc in procs]


def last_line(output):
    return output.strip().splitlines()[-1]


@pytest.mark.slow  # two ranks start Python and torch, twice
def test_ranks_that_see_another_checkpoint_or_none_all_stop(image_folder, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    write_checkpoint(nodes[0] / "out", epoch=1)
    argv = ["--data_path", image_folder, "--output_dir", "out", "--resume", "out", "--epochs", 3, "--num_workers", 0,
            "--batch_size", 2]
    host = socket.gethostname()
    results = two_ranks(argv, nodes)
    for status, output in results:
        assert status == 1 and "Traceback" not in output, output
        assert last_line(output) == (f"--resume out/checkpoint-last.pth: rank 1 on {host} cannot read it (checkpoint "
                                     f"out/checkpoint-last.pth does not exist); every node must see the same "
                                     f"checkpoint folder (a shared disk)")
    write_checkpoint(nodes[1] / "out", epoch=0)  # a stale copy on the other node
    for status, output in two_ranks(argv, nodes):
        assert status == 1 and last_line(output) == (
            f"--resume out/checkpoint-last.pth: rank 1 on {host} reads another copy (saved at epoch 1 step 0; rank "
            f"0's: epoch 2 step 0); every node must see the same checkpoint folder (a shared disk)"), output
    assert read_checkpoint(nodes[0] / "out" / "checkpoint-last.pth")["epoch"] == 1  # untouched


@pytest.mark.slow  # two ranks start Python, torch and transformers
def test_caption_store_that_a_rank_cannot_see_stops_every_rank(tiny_llm_path, tmp_path):
    data = tmp_path / "captioned"
    os.makedirs(data / "images")
    os.makedirs(data / "captions")
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(data / "images" / f"{i}.png")
        (data / "captions" / f"{i}.txt").write_text(f"赤の濃さ{i}", encoding="utf-8")
    caches = [tmp_path / "node0_cache", tmp_path / "node1_cache"]  # each node's own ~/.cache/jit
    argv = ["--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path, "--data_path", data, "--output_dir",
            tmp_path / "out", "--epochs", 1, "--num_workers", 0, "--batch_size", 2]
    results = two_ranks(argv, [tmp_path, tmp_path], [{"JIT_CACHE_DIR": str(cache)} for cache in caches])
    host = socket.gethostname()
    for (status, output), cache in zip(results, caches):  # each rank names its own folder
        assert status == 1 and "Traceback" not in output and "KeyError" not in output, output
        line = last_line(output)
        assert line.startswith(str(cache / "text_features")) and line.endswith(
            f": rank 0 on {host} does not see 2 caption(s) that other ranks embedded into this caption store: it "
            f"must be a folder every node shares (set $JIT_CACHE_DIR or --text_cache_dir to one)"), line
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


@pytest.mark.slow  # torchrun starts two ranks twice
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(image_folder, tmp_path):
    """--output_dir X --resume X under torchrun --max-restarts: a worker killed after the first checkpoint, torchrun
    restarts both ranks, they continue from X's checkpoint (the refusal to overwrite does not stop a restart). With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README says: torch 2.14's torchrun otherwise hands restarted workers
    its rendezvous store with the previous attempt's keys (a restarted rank may read a dead peer's address)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           MAIN, *TINY, "--data_path", str(image_folder), "--output_dir", str(out), "--resume", str(out),
           "--epochs", "8", "--batch_size", "2", "--num_workers", "0", "--log_freq", "1", "--save_last_freq", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    deadline = time.time() + 300
    while not (out / "checkpoint-last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if MAIN in " ".join(p.cmdline())]
    assert len(workers) == 2 and proc.poll() is None
    workers[1].send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    resumed = [line for line in output.splitlines() if f"resumed from {out}/checkpoint-last.pth" in line]
    assert len(resumed) == 1, output
    final = read_checkpoint(out / "checkpoint-last.pth")
    assert final["epoch"] == 7 and final["resume_state"]["epoch"] == 8
