"""Run under torchrun: main_jit's caption set-up (Denoiser, then setup_captions: the caption store built across the
ranks) of a tiny -Text model, twice: with the captions of argv[3] (one per line) of which some are not stored yet,
then for a new model (a restarted run) with all of them stored. accelerate is hidden (a None entry in sys.modules
makes its import fail), so the LLM loads as it does where accelerate is not installed. Rank 0 saves, per rank, the
LLM loads (dtype) of each set-up and whether any loaded LLM is still alive, to argv[4].
argv: LLM folder, caption store folder, captions file, output file."""
import gc
import sys
import types
import weakref

sys.modules["accelerate"] = None

import torch.distributed as dist  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import util.misc as misc  # noqa: E402
from denoiser import Denoiser  # noqa: E402
from util.args import get_args_parser  # noqa: E402
from util.datasets import setup_captions  # noqa: E402

llm_path, store_root, captions_file, out = sys.argv[1:5]
loads, alive = [], []
load = AutoModel.from_pretrained


def counting(*args, **kwargs):
    model = load(*args, **kwargs)
    loads[-1].append(str(next(model.parameters()).dtype))
    alive.append(weakref.ref(model))
    return model


AutoModel.from_pretrained = counting
args = get_args_parser().parse_args(["--model", "JiT-T/4-Text", "--img_size", "32", "--device", "cpu",
                                     "--precision", "fp32", "--llm_model_name", llm_path,
                                     "--text_cache_dir", store_root])
misc.init_distributed_mode(args)  # gloo on the CPU
with open(captions_file, encoding="utf-8") as f:
    captions = f.read().splitlines()
data = types.SimpleNamespace(captions=captions, samples=[(None, i) for i in range(len(captions))])  # one image each
report = {}
for run in ("missing", "cached"):
    loads.append([])
    model = Denoiser(args)
    setup_captions(args, model, data)
    gc.collect()
    report[run] = {"loads": loads[-1], "alive": sum(ref() is not None for ref in alive),
                   "held": model.net.y_embedder.caption_llm.model is not None,
                   "store": len(model.net.y_embedder.store)}
reports = [None] * args.world_size
dist.all_gather_object(reports, report)
if args.rank == 0:
    torch.save(reports, out)
dist.destroy_process_group()
