"""The frozen LLM's memory (text_conditioning.CaptionLLM): its weights are loaded only by a process that has captions
to embed, in the dtype they compute in, and released after; a start-up with every caption in the caption store
loads none. In-process with util/datasets.setup_captions, and across two torchrun ranks (gloo)."""
import gc
import os
import subprocess
import sys
import types

import pytest
import torch

from denoiser import Denoiser
from util.datasets import setup_captions
from text_conditioning import CaptionLLM, trainable_llm_warning
from util.text_store import build_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["赤い丸の写真", "青い四角の写真", "a green triangle", "黄色い星の写真"]


def text_args(make_args, llm, tmp_path, *extra):
    return make_args("--model", "JiT-T/4-Text", "--llm_model_name", llm, "--text_cache_dir", str(tmp_path / "stores"),
                     *extra)


def start(args, captions=CAPTIONS):
    """main_jit's start-up of a -Text model: the Denoiser, then its captions (the store built where missing)."""
    model = Denoiser(args)
    setup_captions(args, model, types.SimpleNamespace(captions=list(captions), samples=[(None, i) for i in range(len(captions))]))
    gc.collect()
    return model


def test_cached_start_up_loads_no_llm_weights(make_args, tiny_llm_path, tmp_path, llm_loads):
    args = text_args(make_args, tiny_llm_path, tmp_path)
    first = start(args)  # embeds the four captions: the weights once, in the CPU's compute dtype, then released
    assert llm_loads.loads == [{"dtype": torch.float32, "device": torch.device("cpu")}]
    assert len(llm_loads.calls) == 1 and llm_loads.models[0]() is None
    assert first.net.y_embedder.caption_llm.model is None
    assert not any(isinstance(m, torch.nn.Embedding) and m.num_embeddings > 100 for m in first.modules())

    again = start(args)  # a restarted run: every caption is in the store
    assert len(llm_loads.loads) == 1 and len(llm_loads.calls) == 1  # no weights loaded, the LLM never ran
    assert again.net.y_embedder.caption_llm.model is None and len(again.net.y_embedder.store) == 4
    ids = torch.arange(4)
    assert torch.equal(again.net.y_embedder.caption_features(ids)[0], first.net.y_embedder.caption_features(ids)[0])

    start(args, CAPTIONS + ["a new prompt"])  # an evaluation prompt not stored yet: loaded for it alone
    assert len(llm_loads.loads) == 2 and len(llm_loads.calls) == 2 and llm_loads.models[1]() is None


def test_weights_are_loaded_in_the_compute_dtype(tiny_llm_path, tmp_path, llm_loads, monkeypatch):
    """On a GPU the frozen LLM computes in bfloat16: from_pretrained gives bfloat16 weights (no float32 copy made
    and cast after). bfloat16 stands in for the GPU's compute dtype on this CPU."""
    monkeypatch.setattr(CaptionLLM, "compute_dtype", staticmethod(lambda device: torch.bfloat16))
    llm = CaptionLLM(tiny_llm_path)
    store = build_store(llm, CAPTIONS, tmp_path, show_progress=False)
    assert llm_loads.loads == [{"dtype": torch.bfloat16, "device": torch.device("cpu")}]
    assert store.meta["compute_dtype"] == "torch.bfloat16" and llm.model is None and llm_loads.models[0]() is None


def test_trainable_llm_is_a_submodule_with_a_memory_warning(make_args, tiny_llm_path, tmp_path, llm_loads):
    model = start(text_args(make_args, tiny_llm_path, tmp_path, "--no-freeze_llm"))
    llm = model.net.y_embedder.encoder.llm
    assert llm_loads.loads == [{"dtype": torch.float32, "device": torch.device("cpu")}]
    assert all(p.requires_grad for p in llm.parameters())
    assert model.net.y_embedder.store is None and not os.path.exists(tmp_path / "stores")  # features go stale
    n = sum(p.numel() for p in llm.parameters())
    assert any(name.startswith("net.y_embedder.encoder.llm.") for name, _ in model.named_parameters())
    line = trainable_llm_warning(llm)
    assert "\n" not in line and f"{n / 1e9:.2f}B parameters" in line and f"{24 * n / 1e9:.1f} GB" in line


@pytest.mark.slow  # ~35 s here: two ranks start Python, torch and transformers
def test_two_ranks_load_only_their_share_and_nothing_when_cached(tiny_llm_path, tmp_path):
    """Three captions stored beforehand, two missing: each rank embeds one (one load each, released); started
    again with all stored, neither rank loads anything. accelerate hidden in the ranks (see tests/ddp_captions.py)."""
    captions = CAPTIONS + ["a new prompt"]
    stores = tmp_path / "stores"
    build_store(CaptionLLM(tiny_llm_path), captions[:3], stores, show_progress=False)
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("\n".join(captions) + "\n", encoding="utf-8")
    out = tmp_path / "report.pt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/ddp_captions.py", tiny_llm_path, str(stores), str(captions_file), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = torch.load(out)
    for rank in ranks:
        assert rank["missing"] == {"loads": ["torch.float32"], "alive": 0, "held": False, "store": 5}
        assert rank["cached"] == {"loads": [], "alive": 0, "held": False, "store": 5}
