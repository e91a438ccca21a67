"""Cluster launch as a GPU cluster runs it, simulated on the CPU: srun's variables (no torchrun), the process-group
timeout and teardown, the NCCL wiring (device_id, the rank's GPU) with torch.cuda stubbed, --device cuda:N, bf16 only
on GPUs that compute it natively, and the loader's CPU share from the affinity set."""
import builtins
import contextlib
import datetime
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import util.misc as misc
from util.datasets import loader_workers
from util.checkpoint import read_checkpoint
from util.preemption import PREEMPTED_EXIT_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "2", "--device", "cpu", "--precision", "fp32"]
# what a launcher may have set around the test run: each test sets its own
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS",
                    "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No torchrun / SLURM variables of the surrounding shell; builtins.print restored after the test (joining a
    process group as rank > 0 silences it)."""
    for name in set(LAUNCH_VARIABLES) | {name for name in os.environ if name.startswith("SLURM_")}:
        monkeypatch.setenv(name, "")  # recorded, so that what the code under test sets is removed after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(builtins, "print", builtins.print)
    return monkeypatch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ SLURM's variables

@pytest.mark.parametrize("nodelist,first", [
    ("gpu03", "gpu03"),
    ("gpu[03-05,09]", "gpu03"),
    ("gpu[03-05,09],cpu01", "gpu03"),
    ("gpu[09,03-05]", "gpu09"),  # the first one written
    ("rack[1-2]-node[01-04]", "rack1-node01"),
    ("n[1-3]-ib", "n1-ib"),
    ("node-007.cluster.org,node-008", "node-007.cluster.org"),
    ("127.0.0.[1-4]", "127.0.0.1"),
])
def test_first_host_of_a_compressed_node_list(nodelist, first):
    assert misc.slurm_first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "gpu[03", "gpu[]", ",gpu01", "gpu03]", "gpu[0 3]"])
def test_a_node_list_that_is_not_one_is_an_error(nodelist):
    with pytest.raises(ValueError, match="not a SLURM node list"):
        misc.slurm_first_host(nodelist)


def test_tasks_per_node_forms():
    assert [misc.slurm_tasks_on_node("4(x2),2", node) for node in range(3)] == [4, 4, 2]
    assert misc.slurm_tasks_on_node("8", 0) == 8
    assert misc.slurm_tasks_on_node("1(x4)", 3) == 1
    with pytest.raises(ValueError, match="has no entry for node 3"):
        misc.slurm_tasks_on_node("4(x2),2", 3)
    with pytest.raises(ValueError, match="not a SLURM task count list"):
        misc.slurm_tasks_on_node("4x2", 0)


def srun_env(procid, ntasks, localid, job_id, **more):
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_JOB_ID": str(job_id), **more}


def test_srun_variables_become_torchruns(clean_launch_env):
    for name, value in srun_env(13, 16, 5, 1234567, SLURM_TASKS_PER_NODE="8(x2)", SLURM_NODEID="1",
                                SLURM_NODELIST="gpu[07-08]").items():
        clean_launch_env.setenv(name, value)
    misc.slurm_environment()
    assert {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 1234567 % 10000)}
    # what the user set is kept; SLURM_NTASKS_PER_NODE (srun --ntasks-per-node) is read before the per-node list
    clean_launch_env.setenv("MASTER_ADDR", "10.0.0.7")
    clean_launch_env.setenv("MASTER_PORT", "29500")
    clean_launch_env.delenv("LOCAL_WORLD_SIZE")
    clean_launch_env.setenv("SLURM_NTASKS_PER_NODE", "4")
    misc.slurm_environment()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["LOCAL_WORLD_SIZE"]) == (
        "10.0.0.7", "29500", "4")


@pytest.mark.parametrize("missing,message", [
    ("SLURM_NODELIST", "SLURM_NODELIST is not set: cannot tell rank 0's node; set MASTER_ADDR to its host name"),
    ("SLURM_JOB_ID", "SLURM_JOB_ID is not set: srun sets it for every task; launch with srun (one task per GPU)"),
    ("SLURM_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE is not set: srun sets it for every task; launch with srun (one "
                             "task per GPU)"),
])
def test_a_missing_srun_variable_is_one_line_naming_it(clean_launch_env, make_args, missing, message):
    for name, value in srun_env(0, 2, 0, 77, SLURM_TASKS_PER_NODE="2", SLURM_NODELIST="gpu01").items():
        if name != missing:
            clean_launch_env.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        misc.init_distributed_mode(make_args())
    assert str(e.value) == message


def test_an_unreadable_node_list_names_its_variable(clean_launch_env, make_args):
    for name, value in srun_env(0, 2, 0, 77, SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="gpu[01-").items():
        clean_launch_env.setenv(name, value)
    with pytest.raises(SystemExit, match=r"^SLURM_JOB_NODELIST: not a SLURM node list: 'gpu\[01-'; set MASTER_ADDR to "
                                         r"rank 0's host name$"):
        misc.init_distributed_mode(make_args())


# ------------------------------------------------------------------ two srun tasks on gloo: train, save, resume

def job_id_with_a_free_port():
    """A SLURM_JOB_ID whose derived master port is free here (tests may run side by side)."""
    for job_id in random.Random().sample(range(10 ** 6), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", misc.SLURM_PORT_BASE + job_id % misc.SLURM_PORT_SPAN))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in the SLURM master port range")


def srun_tasks(args, job_id, logs):
    """main_jit.py as srun starts 2 tasks on one node: SLURM's variables only (no torchrun, no MASTER_*)."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    procs = []
    for rank in range(2):
        env = dict(base, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   **srun_env(rank, 2, rank, job_id, SLURM_TASKS_PER_NODE="2", SLURM_NODEID="0",
                              SLURM_NODELIST="127.0.0.[1-4],gpu[01-02]"))
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "main_jit.py", *TINY, *map(str, args)], cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_for(path, text, procs, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if text in path.read_text():
            return True
        time.sleep(0.02)
    return text in path.read_text()


def finish(procs, logs):
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, [log.read_text() for log in logs]


@pytest.mark.slow
def test_two_srun_tasks_train_save_and_resume(image_folder, tmp_path):
    out, logs = tmp_path / "out", [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    args = ["--data_path", image_folder, "--output_dir", out, "--resume", out, "--batch_size", 2,
            "--num_workers", 0, "--epochs", 2, "--warmup_epochs", 1, "--blr", 1e-3, "--log_freq", 1]
    job_id = job_id_with_a_free_port()
    port = misc.SLURM_PORT_BASE + job_id % misc.SLURM_PORT_SPAN
    procs = srun_tasks(args, job_id, logs)
    started = wait_for(logs[0], "Epoch [0] [1/4]", procs)  # both ranks are past start-up: they stepped together
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks agree over the main group
    codes, text = finish(procs, logs)
    assert started and codes == [PREEMPTED_EXIT_CODE] * 2, text
    for rank in (0, 1):
        assert f"| distributed init (rank {rank}, world 2, gloo on cpu, timeout 60 min): env://127.0.0.1:{port}" \
            in text[rank]
    ckpt = read_checkpoint(out / "checkpoint-last.pth")
    state = ckpt["resume_state"]
    step = state["epoch"] * 4 + state["step"]  # 16 images / (2 tasks x batch 2): 4 steps per epoch
    assert 2 <= step < 8 and len(state["rng"]) == 2 and ckpt["args"].world_size == 2
    assert {s["step"].item() for s in ckpt["optimizer"]["state"].values()} == {step}
    where = f"at epoch {state['epoch']} step {state['step']}: checkpoint-last.pth saved; exiting with status 75"
    assert f"preempted (SIGUSR1) {where}" in text[1]
    assert f"preempted (a stop signal to another rank) {where}" in text[0]  # the same step on both ranks

    codes, text = finish(srun_tasks(args, job_id, logs), logs)
    assert codes == [0, 0], text
    assert f"continuing at epoch {state['epoch']} step {state['step']}" in text[0]
    final = read_checkpoint(out / "checkpoint-last.pth")
    assert final["epoch"] == 1 and final["resume_state"]["step"] == 0 and len(final["resume_state"]["rng"]) == 2
    assert {s["step"].item() for s in final["optimizer"]["state"].values()} == {8}  # continued, not restarted


# ------------------------------------------------------------------ the process group: timeout, NCCL, teardown

def torchrun_env(env, rank, world_size, local_rank, port):
    for name, value in {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank,
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        env.setenv(name, str(value))


def test_a_rank_that_nobody_joins_stops_after_dist_timeout_in_one_line(clean_launch_env, make_args):
    port = free_port()
    torchrun_env(clean_launch_env, 0, 2, 0, port)
    start = time.time()
    with pytest.raises(SystemExit) as e:
        misc.init_distributed_mode(make_args("--dist_timeout", "0.05"))  # 3 s; rank 1 never comes
    assert time.time() - start < 30
    message = str(e.value)
    assert "\n" not in message and not dist.is_initialized()
    assert message.startswith(f"rank 0: could not join the 2 ranks at env://127.0.0.1:{port} within --dist_timeout "
                              f"0.05 min (")
    assert message.endswith("); check that every rank was started and can reach that address")


def fake_gpus(monkeypatch, count):
    """torch.cuda as on a machine with `count` GPUs, recording set_device calls (no CUDA call is made)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    return calls


def test_nccl_joins_on_the_ranks_gpu_with_device_id_and_the_timeout(clean_launch_env, make_args):
    calls = fake_gpus(clean_launch_env, 8)
    clean_launch_env.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    clean_launch_env.setattr(dist, "barrier", lambda: calls.append(("barrier",)))
    torchrun_env(clean_launch_env, 11, 16, 3, 29500)
    args = make_args("--device", "cuda:6", "--dist_timeout", "90")
    misc.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (11, 16, 3, True)
    assert calls == [("set_device", 3),  # the local rank's GPU, not --device's index; current before NCCL starts
                     ("init", {"backend": "nccl", "init_method": "env://", "world_size": 16, "rank": 11,
                               "timeout": datetime.timedelta(minutes=90), "device_id": torch.device("cuda", 3)}),
                     ("barrier",)]


@pytest.mark.parametrize("visible,procid,localid,gpu", [
    (4, 6, 3, 3),  # srun -m cyclic over 2 nodes: ranks 0, 2, 4, 6 share a node (rank % 4 would give 0, 2, 0, 2)
    (1, 5, 5, 0),  # srun --gpus-per-task=1: each task sees its one GPU as cuda:0
])
def test_srun_task_takes_its_local_gpu_modulo_the_visible_ones(clean_launch_env, make_args, visible, procid, localid,
                                                               gpu):
    calls = fake_gpus(clean_launch_env, visible)
    clean_launch_env.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    clean_launch_env.setattr(dist, "barrier", lambda: None)
    for name, value in srun_env(procid, 8, localid, 9, SLURM_TASKS_PER_NODE="4(x2)",
                                SLURM_NODELIST="gpu[01-02]").items():
        clean_launch_env.setenv(name, value)
    args = make_args("--device", "cuda")
    misc.init_distributed_mode(args)
    assert args.gpu == gpu and calls[0] == ("set_device", gpu)
    assert calls[1][1]["device_id"] == torch.device("cuda", gpu)


class Failure(Exception):
    pass


@pytest.mark.parametrize("exit_with,teardown", [
    (None, "destroy"),  # the end of the run
    (SystemExit(PREEMPTED_EXIT_CODE), "destroy"),  # the preemption exit, at the same step on every rank
    (SystemExit("--data_path x: no train/ folder"), "abort"),  # one line: maybe this rank's alone
    (Failure("a traceback"), "abort"),
])
def test_the_process_group_is_closed_on_every_way_out(clean_launch_env, make_args, exit_with, teardown):
    torchrun_env(clean_launch_env, 0, 1, 0, free_port())
    closed = []
    destroy, abort = dist.destroy_process_group, dist.distributed_c10d._abort_process_group
    clean_launch_env.setattr(dist, "destroy_process_group", lambda: closed.append("destroy") or destroy())
    clean_launch_env.setattr(dist.distributed_c10d, "_abort_process_group", lambda: closed.append("abort") or abort())
    try:
        with misc.distributed_mode(make_args()):
            assert dist.is_initialized() and dist.get_backend() == "gloo"
            if exit_with is not None:
                raise exit_with
    except (SystemExit, Failure) as e:
        assert e is exit_with  # passed on unchanged
    assert closed == [teardown] and not dist.is_initialized()


# ------------------------------------------------------------------ devices, precision, CPUs

def test_device_index_is_honoured_and_made_current(monkeypatch):
    calls = fake_gpus(monkeypatch, 4)
    assert misc.resolve_device("cuda:3") == torch.device("cuda", 3)
    assert misc.resolve_device("cuda") == torch.device("cuda", 0)  # the current device
    assert misc.resolve_device("cuda:3", gpu=2) == torch.device("cuda", 2)  # torchrun / srun: the local rank's
    assert calls == [("set_device", 3), ("set_device", 0), ("set_device", 2)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(SystemExit, match=r"^--device cuda:4: cuda:4 does not exist; 4 CUDA device\(s\) visible "
                                         r"\(CUDA_VISIBLE_DEVICES=0,1,2,3\)$"):
        misc.resolve_device("cuda:4")
    with pytest.raises(SystemExit, match=r"^--device cuda: local rank 5's GPU cuda:5 does not exist; 4 CUDA "):
        misc.resolve_device("cuda", gpu=5)
    with pytest.raises(SystemExit, match="^--device cuda:x: expected cpu, cuda or mps$"):
        misc.resolve_device("cuda:x")
    assert len(calls) == 3  # nothing made current on an error


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_on_gpus_computing_it_natively(monkeypatch, capsys, native, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: asked.append(kw) or native)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    assert misc.resolve_precision("auto", torch.device("cuda", 1)) == expected
    assert asked == [{"including_emulation": False}]  # emulated bf16 (e.g. V100, T4) is ~an order slower
    lines = capsys.readouterr().out.splitlines()
    assert lines == ([] if native else ["--precision auto: fp32, as Tesla V100-SXM2-32GB has no native bf16 "
                                        "(compute capability 7.0, below 8.0)"])
    assert misc.resolve_precision("bf16", torch.device("cuda", 1)) == "bf16"  # asked for: kept


@pytest.mark.parametrize("env,affinity,workers", [
    ({}, 6, 6),  # one process: every CPU it may use, not the machine's 64
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),  # torchrun: its processes share the set
    ({"LOCAL_WORLD_SIZE": "8", "SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "6"}, 6, 6),  # srun, tasks bound
    ({"LOCAL_WORLD_SIZE": "8", "SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "6"}, 48, 6),  # srun, tasks not bound
    ({"LOCAL_WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "48", "TORCHELASTIC_RUN_ID": "x"}, 48,
     6),  # torchrun inside one srun task
    ({"LOCAL_WORLD_SIZE": "8"}, 4, 1),  # at least one
])
def test_loader_workers_come_from_the_cpus_this_process_may_use(clean_launch_env, make_args, env, affinity,
                                                                 workers):
    clean_launch_env.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    clean_launch_env.setattr(os, "cpu_count", lambda: 64)
    for name, value in env.items():
        clean_launch_env.setenv(name, value)
    assert loader_workers(make_args("--num_workers", "12")) == workers
    assert loader_workers(make_args("--num_workers", "0")) == 0



@pytest.mark.parametrize("agent_store,max_restarts,warned", [("True", "3", True), ("True", "0", False),
                                                             ("False", "3", False)])
def test_torchrun_restarts_through_its_shared_store_are_warned_of(clean_launch_env, make_args, capsys, agent_store,
                                                                   max_restarts, warned):
    """torch 2.14's torchrun hands its ranks the rendezvous store with no per-attempt prefix: with --max-restarts a
    restarted rank can read a dead rank's address (seen here: 2 of 3 restarts of a killed gloo worker failed or hung
    without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, 3 of 3 rejoined with it). Rank 0 says so at start."""
    clean_launch_env.setattr(dist, "init_process_group", lambda **kwargs: None)
    clean_launch_env.setattr(dist, "barrier", lambda: None)
    torchrun_env(clean_launch_env, 0, 2, 0, 29500)
    clean_launch_env.setenv("TORCHELASTIC_USE_AGENT_STORE", agent_store)
    clean_launch_env.setenv("TORCHELASTIC_MAX_RESTARTS", max_restarts)
    misc.init_distributed_mode(make_args())
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts that rejoin" in capsys.readouterr().out) == warned
