"""Run under torchrun: the start-up of main_jit (process seed = seed + rank, Denoiser, main_jit.distribute), then
3 AdamW steps on different data per rank; every rank saves its live weights and both EMA tracks after start-up and
after the steps to <argv[1]>.rank<r>. tests/test_train.py checks that all ranks hold the same tracks."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import util.misc as misc  # noqa: E402
from denoiser import Denoiser  # noqa: E402
from main_jit import distribute  # noqa: E402
from test_train import tiny_args  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
args = tiny_args("--ema_decay1", "0.9", "--ema_decay2", "0.5")
misc.seed_everything(args.seed + rank)
model = Denoiser(args)
ddp = distribute(model, torch.device("cpu"))


def snapshot():
    return ({k: v.clone() for k, v in model.state_dict().items()}, [[t.clone() for t in track] for track in model.ema_params])


snapshots = {"start": snapshot()}
optimizer = misc.build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
for _ in range(3):
    x = torch.rand(4, 3, 32, 32) * 2 - 1  # each rank its own data (its own seed)
    ddp(x, torch.randint(0, 2, (4,))).backward()
    optimizer.step()
    optimizer.zero_grad()
    model.update_ema()
snapshots["steps"] = snapshot()
torch.save(snapshots, f"{sys.argv[1]}.rank{rank}")
dist.destroy_process_group()
