"""Shared fixtures for the JiT core tests (model_jit.py, denoiser.py, util/checkpoint.py).

Everything runs on the CPU with tiny configs (JiT-T/4 at 32 px or small custom JiT instances); the published
configs are only built on the meta device.
"""
import builtins
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

# no test may reach for the network: Inception falls back to the packaged offline network, hubs are off
os.environ["JIT_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# nor read or write the user's caches: converted Inception weights and caption features go to a temporary
# $JIT_CACHE_DIR, torch.hub's folder (where torch-fidelity's Inception download would be found) is an empty
# temporary $TORCH_HOME. Set here, before any test module is imported; subprocesses inherit both.
SESSION_CACHE = tempfile.mkdtemp(prefix="jit_test_cache_")
os.environ["JIT_CACHE_DIR"] = os.path.join(SESSION_CACHE, "jit")
os.environ["TORCH_HOME"] = os.path.join(SESSION_CACHE, "torch")
os.environ["HF_DATASETS_CACHE"] = os.path.join(SESSION_CACHE, "hf_datasets")  # parquet folders are converted there


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.args import get_args_parser  # noqa: E402

TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "10", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture
def make_args():
    """Parsed command-line namespace: the tiny defaults above, overridden by `argv`."""

    def make(*argv, tiny=True):
        return get_args_parser().parse_args((TINY if tiny else []) + list(argv))

    return make


def run_main_in_process(args, monkeypatch):
    """main_jit.main(args) in this process, as main_jit.py's __main__ runs it (inside misc.distributed_mode), so that a
    test can watch its objects; the process is left as it was: RNG states, builtins.print (main replaces it) and
    glibc's malloc settings (main changes them on CPUs). Returns args (main resolves some of them)."""
    import main_jit
    import util.misc as misc

    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setattr(misc, "keep_freed_cpu_memory", lambda device: False)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        with misc.distributed_mode(args):  # a single process: no group, print as main_jit.py's __main__ sets it
            main_jit.main(args)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return args


@torch.no_grad()
def perturb_(module, std=0.05, seed=1234):
    """Add seeded Gaussian noise to every trainable parameter (the zero-initialised layers become nonzero)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


@pytest.fixture
def perturb():
    return perturb_


# ------------------------------------------------------------------ text conditioning (tests/test_text.py)
TINY_LLM_CORPUS = [
    "犬の写真", "猫の写真", "赤いりんごの写真", "青い空と白い雲", "富士山の夜明けの風景",
    "a photo of a dog", "a photo of a cat", "a red apple on a wooden table", "the blue sky with white clouds",
    "金魚が水槽で泳いでいる", "一匹の黒い猫が窓辺で眠っている", "a goldfish swimming in a bowl",
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """<root>/train/{a,b}/*.png: 8 random images per class, 34-41 x 38 px (not square: the crop runs), b brighter."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for i in range(8):
            pixels = rng.integers(0, 200, (34 + i, 38, 3)) + (50 if c == "b" else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory):
    """Folder with a tiny random LlamaModel (hidden 32, 2 layers, 2 heads) and a byte-level BPE tokenizer trained
    on a few Japanese and English sentences (bos <s> prepended, eos </s>, pad <pad>), loadable by path with
    AutoModel / AutoTokenizer.from_pretrained. Built locally in about a second: no download."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llm")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_LLM_CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"])
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=bos_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the session's RNG state
        torch.manual_seed(0)
        model = LlamaModel(config)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def llm_loads(monkeypatch):
    """Counts what happens to LLM weights from now on: `loads` (calls of transformers' AutoModel.from_pretrained,
    the only way the code loads LLM weights), `calls` (forward calls of the loaded models) and `models` (weak
    references to them: dead once the weights are released)."""
    import types
    import weakref

    from transformers import AutoModel

    record = types.SimpleNamespace(loads=[], calls=[], models=[])
    load = AutoModel.from_pretrained

    def counting(*args, **kwargs):
        model = load(*args, **kwargs)
        record.loads.append({"dtype": next(model.parameters()).dtype, "device": next(model.parameters()).device})
        model.register_forward_hook(lambda *_: record.calls.append(1))
        record.models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModel, "from_pretrained", counting)
    return record
