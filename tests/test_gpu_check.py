"""gpu_check.py, the first-GPU check: its CPU run end to end (what CI runs so that it cannot rot), and its parts: a
failing check's report, the SIGKILL of a launcher and the ranks it started, the nvidia-smi memory poll, the output
folder."""
import argparse
import builtins
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

import gpu_check
import util.misc as misc
from text_image_dataset import TextImageDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cpu_run_passes_every_check_with_sane_figures(tmp_path, tiny_llm_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--out", str(out), "--llm_model_name",
                             tiny_llm_path], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    rows = {row["check"]: row for row in report["checks"]}
    # the SmolLM2 conversion is left out: --llm_model_name names the LLM
    assert list(rows) == ["reference", "kill", "resume", "two_ranks", "evaluate", "sample", "text_train", "text_sample",
                          "bench"]
    for row in rows.values():
        assert row["result"] == "PASS" and row["note"] is None, row
        seconds = f"{row['figures']['time_s']:.1f} s"
        assert re.search(rf"^{re.escape(row['title'])} +PASS +{re.escape(seconds)}", result.stdout, re.M), row["title"]
        assert 0 < row["figures"]["time_s"] < 600 and row["commands"]
        assert all(f"    $ {command}" in result.stdout for command in row["commands"])
    assert "9 passed, 0 failed, 0 skipped" in result.stdout
    figures = {key: row["figures"] for key, row in rows.items()}

    settings = f"{misc.resolve_precision('auto', torch.device('cpu'))}, eager"  # CPU defaults: no torch.compile
    for key in ("kill", "resume", "two_ranks", "text_train"):
        assert figures[key]["settings"] == settings
    assert figures["kill"]["launch"] == "torchrun, 1 rank, gloo"
    assert figures["two_ranks"]["launch"] == "torchrun, 2 ranks, gloo"
    killed = re.fullmatch(r"SIGKILL after epoch 1 step (\d+)", figures["kill"]["killed"])
    saved = re.fullmatch(r"checkpoint at epoch 1 step (\d+)", figures["kill"]["checkpoint"])
    assert killed and saved and 5 <= int(killed.group(1)) < 10  # 80 digits in batches of 8: killed past step 5 of 10
    # a checkpoint after every step: the kill leaves the last step's, or the one before if it hit the write
    assert int(killed.group(1)) - 1 <= int(saved.group(1)) <= int(killed.group(1))
    assert figures["resume"]["resumed"] == f"continued at epoch 1 step {saved.group(1)}"
    assert 0 < figures["resume"]["final_loss"] < 5

    assert figures["reference"]["images"] == 20 and figures["evaluate"]["images"] == 10
    for key in ("two_ranks", "evaluate"):  # a few dozen steps on digits: far from the reference, but finite
        assert 1 < figures[key]["fid"] < 1000
    for key in ("two_ranks", "text_train", "bench"):
        assert 1 < figures[key]["img_per_s"] < 10000
    captions = len(TextImageDataset(str(out / "data" / "digits_captioned")).captions)
    assert figures["text_train"]["llm_on"] == f"LLM on cpu (float32): {captions} captions embedded"
    assert figures["sample"]["images"] == 20 and figures["text_sample"]["images"] == 4
    assert figures["bench"]["bench"].startswith("JiT-T/4 @ 16, batch 8, ")
    assert 0 < figures["bench"]["mfu"] < 1 and 0 < figures["bench"]["mfu_paired"] < 1
    assert 0.1 < figures["bench"]["train_peak_gib"] < 8


def passing(c):
    c.run([sys.executable, "-c", "print('fine')"])
    return {"images": 3}


def failing(c):
    c.run([sys.executable, "-c", "print('\\n'.join(f'line {i}' for i in range(50))); raise SystemExit(3)"])
    return {}


def needs_failing(c):
    raise AssertionError("a check whose needed check failed must not run")


def test_a_failing_check_shows_its_tail_skips_what_needs_it_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CHECKS", [("tool", "a tool that fails", failing, ()),
                                              ("after", "a check that needs it", needs_failing, ("tool",)),
                                              ("other", "an independent check", passing, ())])
    with pytest.raises(SystemExit) as exit_status:
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out")])
    assert exit_status.value.code == 1
    printed = capsys.readouterr().out
    log = tmp_path / "out" / "logs" / "01_tool.log"
    assert f"[1] a tool that fails ... FAIL (exit status 3: python -c " in printed
    # the last 30 lines of the log: 'line 20' to 'line 49'
    assert f"    last 30 lines of {log}:\n    | line 20\n" in printed and "    | line 49\n" in printed
    assert "| line 19\n" not in printed
    assert "[2] a check that needs it ... SKIP (needs: tool)" in printed
    assert re.search(r"^an independent check +PASS +[0-9.]+ s, 3 images$", printed, re.M)
    assert "1 passed, 1 failed, 1 skipped" in printed
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["checks"]
    assert [(row["check"], row["result"]) for row in rows] == [("tool", "FAIL"), ("after", "SKIP"), ("other", "PASS")]
    assert rows[0]["log"] == str(log) and rows[1]["commands"] == []


def gpu_start_up_log(monkeypatch, capsys, make_args, ranks, native_bf16):
    """(what main_jit.py prints at start-up on `ranks` GPUs under torchrun, the precision it resolves), made by
    util.misc itself with torch.cuda and the process group stubbed: each rank's init line, and on a GPU without native
    bf16 the precision line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: ranks)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    original_print = builtins.print
    monkeypatch.setattr(builtins, "print", original_print)  # restored after the test
    for rank in range(ranks):
        for name, value in dict(RANK=rank, WORLD_SIZE=ranks, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=29500).items():
            monkeypatch.setenv(name, str(value))
        misc.init_distributed_mode(make_args("--device", "cuda"))
        builtins.print = original_print  # each rank is a process of its own: rank 1 silenced only itself
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: native_bf16)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    precision = misc.resolve_precision("auto", torch.device("cuda", 0))
    return capsys.readouterr().out, precision


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16 GPU", "GPU without native bf16"])
def test_the_cuda_expectations_read_what_main_jit_prints_on_gpus(tmp_path, monkeypatch, capsys, make_args,
                                                                 native_bf16):
    log, precision = gpu_start_up_log(monkeypatch, capsys, make_args, 2, native_bf16)
    checker = gpu_check.Checker("cuda", str(tmp_path))
    assert checker.gpus == 2
    assert checker.check_launch(log, 2) == "torchrun, 2 ranks, nccl"
    with pytest.raises(gpu_check.CheckFailed, match=r"expected 2 rank\(s\) joining with nccl on cuda:0, cuda:1"):
        checker.check_launch(log.replace("cuda:1", "cuda:0"), 2)  # two ranks on one GPU
    compiled = argparse.Namespace(precision=precision, compile=True)  # the checkpoint's args
    assert checker.check_settings(compiled, log) == ("bf16, compiled" if native_bf16 else
                                                     "fp32 (no native bf16 on Tesla V100-SXM2-32GB), compiled")
    with pytest.raises(gpu_check.CheckFailed, match=r"^--compile resolved to False on cuda$"):
        checker.check_settings(argparse.Namespace(precision=precision, compile=False), log)
    if native_bf16:  # fp32 without main_jit.py saying that the GPU lacks bf16
        with pytest.raises(gpu_check.CheckFailed, match=r"^trained in fp32, expected bf16$"):
            checker.check_settings(argparse.Namespace(precision="fp32", compile=True), log)


def test_two_ranks_are_skipped_on_one_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    checker = gpu_check.Checker("cuda", str(tmp_path))
    (tmp_path / "logs").mkdir()
    checker.check("two_ranks", "train 2 ranks", gpu_check.train_two_ranks)
    assert [(row["result"], row["note"], row["commands"]) for row in checker.rows] == [("SKIP", "1 GPU visible", [])]
    assert "[1] train 2 ranks ... SKIP (1 GPU visible)" in capsys.readouterr().out


LAUNCHER = """
import subprocess, sys, time
# like torchrun: its rank in a session of its own, out of the launcher's process group
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("rank", rank.pid, flush=True)
time.sleep(120)
"""


def test_kill_when_kills_the_launcher_and_the_ranks_it_started(tmp_path):
    checker = gpu_check.Checker("cpu", str(tmp_path))
    checker.commands, checker.seconds, checker.log = [], 0.0, str(tmp_path / "kill.log")
    start = time.time()
    output = checker.run([sys.executable, "-c", LAUNCHER], kill_when=lambda log: "rank " in log)
    assert checker.killed and time.time() - start < 60
    rank = int(re.search(r"rank (\d+)", output).group(1))
    assert not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE


def test_commands_run_offline_and_outside_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")  # an sbatch script's environment: task 0 of a job of 8 tasks
    monkeypatch.setenv("SLURM_NTASKS", "8")
    checker = gpu_check.Checker("cpu", str(tmp_path))
    checker.commands, checker.seconds, checker.log = [], 0.0, str(tmp_path / "env.log")
    output = checker.run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"])
    env = json.loads(output)
    assert not [name for name in env if name.startswith("SLURM_")]
    assert {name: env[name] for name in ("JIT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} == \
        {"JIT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def fake_nvidia_smi(folder, readings):
    """An nvidia-smi printing readings[n] (MiB per GPU) at its n-th call (the last one from then on) and recording
    its arguments."""
    script = folder / "nvidia-smi"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
count = len(os.listdir(os.path.join(here, "calls")))
with open(os.path.join(here, "calls", str(count)), "w") as f:
    json.dump(sys.argv[1:], f)
readings = {readings!r}
print("\\n".join(str(v) for v in readings[min(count, len(readings) - 1)]))
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (folder / "calls").mkdir()


def test_gpu_memory_peak_is_the_largest_growth_on_any_gpu(tmp_path, monkeypatch):
    # MiB on two GPUs: the baseline, then GPU 1 grows by 3072 (the peak), then everything is freed again
    fake_nvidia_smi(tmp_path, [(1000, 500), (1512, 1524), (3048, 3572), (1000, 500)])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with gpu_check.GpuMemoryPeak(interval=0.01) as memory:
        while len(os.listdir(tmp_path / "calls")) < 6:
            time.sleep(0.01)
    assert memory.gib == 3072 / 1024
    arguments = json.loads((tmp_path / "calls" / "0").read_text())
    assert arguments == ["--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=2,3"]


def test_gpu_memory_peak_without_nvidia_smi_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    with gpu_check.GpuMemoryPeak(interval=0.01) as memory:
        time.sleep(0.05)
    assert memory.gib is None


def test_an_output_folder_it_did_not_write_is_refused_and_its_own_is_replaced(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.txt").write_text("keep")
    with pytest.raises(SystemExit, match=rf"--out {re.escape(str(theirs))} exists and was not written by "
                                         r"gpu_check.py; choose another folder"):
        gpu_check.main(["--device", "cpu", "--out", str(theirs)])
    assert (theirs / "results.txt").read_text() == "keep"

    ours = tmp_path / "ours"
    gpu_check.prepare_output(str(ours))
    (ours / "train").mkdir()
    gpu_check.prepare_output(str(ours))  # a rerun starts from an empty folder
    assert sorted(os.listdir(ours)) == [gpu_check.MARKER, "logs"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^gpu_check.py: error: --device cuda: CUDA is not available on this "
                                         r"machine; use --device cpu$"):
        gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_llm_folder_without_config_is_one_line(tmp_path):
    (tmp_path / "llm").mkdir()
    with pytest.raises(SystemExit, match=r"--llm_model_name .*llm: the folder has no config.json"):
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--llm_model_name", str(tmp_path / "llm")])
    assert not (tmp_path / "out").exists()
