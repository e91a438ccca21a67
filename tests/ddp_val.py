"""Run under torchrun: the validation loss of test_validation's fixed tiny model on this rank's share of the folder
argv[1] (batch size 2, another than the single process's); rank 0 saves it with each rank's image count to
argv[2]. tests/test_validation.py compares it with one process."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import util.misc as misc  # noqa: E402
from engine_jit import validation_loss  # noqa: E402
from util.datasets import build_dataset, build_val_loader  # noqa: E402
from test_validation import parse, tiny_model  # noqa: E402

args = parse("--data_path", sys.argv[1], "--batch_size", 2)
misc.init_distributed_mode(args)  # gloo on the CPU; sets args.rank and args.world_size
loader = build_val_loader(args, build_dataset(args, False).samples)
loss, count = validation_loss(tiny_model(args), loader, torch.device("cpu"), args)
counts = [None] * args.world_size
dist.all_gather_object(counts, len(loader.sampler))
if args.rank == 0:
    torch.save({"loss": loss, "count": count, "rank_counts": counts}, sys.argv[2])
dist.destroy_process_group()
