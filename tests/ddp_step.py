"""Run under torchrun: one DDP training step (SGD, so the update is the averaged gradient itself) of a tiny Denoiser on this rank's half of a fixed batch, with fixed
times and noise; rank 0 saves the updated weights to argv[1]. tests/test_train.py compares them to one process
holding the whole batch."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from test_train import fixed_batch, one_step_model  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, optimizer = one_step_model()
ddp = torch.nn.parallel.DistributedDataParallel(model)
x, labels, t, noise = (v.chunk(world)[rank] for v in fixed_batch())
ddp(x, labels, t=t, noise=noise).backward()
optimizer.step()
model.update_ema()
if rank == 0:
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"model": model.state_dict(), "ema1": model.ema_state_dict(1), "grads": grads}, sys.argv[1])
dist.destroy_process_group()
