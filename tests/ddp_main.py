"""Run under torchrun: main_jit.main itself with the flags argv[2:], each rank keeping the Denoiser that main builds
and the DistributedDataParallel it trains through; torch.compile (--compile) traces with dynamo's eager backend (no
inductor compile). After the run every rank saves its live weights, both EMA tracks and DDP's settings to
<argv[1]>.rank<r>. tests/test_train.py compares the ranks."""
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import main_jit  # noqa: E402

built, wrapped = [], []
build_denoiser = main_jit.Denoiser
main_jit.Denoiser = lambda args: built.append(build_denoiser(args)) or built[-1]
torch_compile = torch.compile
torch.compile = lambda fn, *args, **kwargs: torch_compile(fn, *args, **{**kwargs, "backend": "eager"})


class RecordedDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wrapped.append(self)


torch.nn.parallel.DistributedDataParallel = RecordedDDP
args = main_jit.get_args_parser().parse_args(sys.argv[2:])
with main_jit.misc.distributed_mode(args):  # as main_jit.py's __main__: joins the ranks, closes the group after
    main_jit.main(args)
model, = built
ddp, = wrapped
torch.save({"model": model.state_dict(), "ema": model.ema_params,
            "ddp": {"gradient_as_bucket_view": ddp.gradient_as_bucket_view,
                    "forward_sync_buffers": ddp.forward_sync_buffers},
            "compiled": [name for name, module in model.named_modules() if module._compiled_call_impl is not None]},
           f"{sys.argv[1]}.rank{os.environ['RANK']}")
