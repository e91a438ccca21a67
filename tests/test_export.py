"""export.py: a checkpoint's weight set as model.safetensors + config.json, loaded by Denoiser.from_pretrained and
sample.py, reproducing the checkpoint's samples bit for bit; official-layout checkpoints; one-line errors."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import export
import sample
from denoiser import Denoiser
from util.args import get_args_parser
from util.checkpoint import read_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_sampling_steps", "2", "--sampling_method", "euler", "--device", "cpu", "--precision", "fp32",
        "--seed", "3"]


@torch.no_grad()
def shift_(tensors, std, seed):
    gen = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)


def tiny_denoiser(*extra):
    """JiT-T/4 at 32 px, 10 classes, whose live weights and both EMA tracks differ (the zero-initialised output
    layers are perturbed so that samples depend on the weights)."""
    args = get_args_parser().parse_args(["--model", "JiT-T/4", "--img_size", "32", "--class_num", "10",
                                         "--device", "cpu", "--cfg", "1.5", "--interval_min", "0.2", *extra])
    torch.manual_seed(0)
    model = Denoiser(args)
    shift_(model.parameters(), 0.05, 1)
    shift_(model.ema_params[0], 0.05, 2)
    shift_(model.ema_params[1], 0.05, 3)
    return model, args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, args = tiny_denoiser()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), 7, args)
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_export_samples_equal_the_checkpoints_bit_for_bit(checkpoint, tmp_path):
    images = {}
    for track in (0, 1, 2):
        folder = tmp_path / f"export{track}"
        export.main(["--checkpoint", str(checkpoint), "--ema", str(track), "--out", str(folder)])
        assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
        # the tensors are the checkpoint's entry, under its own net.* keys
        entry = read_checkpoint(checkpoint)["model" if track == 0 else f"model_ema{track}"]
        tensors = safetensors.torch.load_file(folder / "model.safetensors")
        assert list(tensors) == sorted(entry) and all(k.startswith("net.") for k in tensors)
        assert all(torch.equal(tensors[k], entry[k]) for k in entry)

        from_pth, from_export = tmp_path / f"pth{track}.png", tmp_path / f"export{track}.png"
        sample.main(["--checkpoint", str(checkpoint), "--ema", str(track), "--classes", "2,7", "--per_class", "2",
                     "--out", str(from_pth), *FAST])
        sample.main(["--checkpoint", str(folder), "--classes", "2,7", "--per_class", "2", "--out", str(from_export),
                     *FAST])
        images[track] = pixels(from_pth)
        assert np.array_equal(images[track], pixels(from_export)), track
    # each weight set draws other images: the comparisons are not vacuous
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_config_and_from_pretrained(checkpoint, tmp_path):
    folder = tmp_path / "export"
    export.main(["--checkpoint", str(checkpoint), "--out", str(folder), "--num_sampling_steps", "30"])
    config = json.loads((folder / "config.json").read_text())
    assert config == {
        "format": "jit-denoiser", "format_version": 1,
        "model": "JiT-T/4", "img_size": 32, "class_num": 10, "use_text_conditioning": False,  # a class model
        "llm_model_name": None, "max_text_len": None, "text_conditioning": None, "text_encoder": None,
        "attn_dropout": 0.0, "proj_dropout": 0.0, "noise_scale": 1.0, "P_mean": -0.8, "P_std": 0.8, "t_eps": 0.05,
        "label_drop_prob": 0.1,
        "sampling_method": "heun", "num_sampling_steps": 30, "cfg": 1.5, "interval_min": 0.2, "interval_max": 1.0,
        "weights": {"ema_track": 1, "ema_decay": 0.9999, "epoch": 7, "checkpoint": "checkpoint-last.pth"},
    }
    model = Denoiser.from_pretrained(str(folder))
    assert not model.training
    assert (model.num_sampling_steps, model.cfg_scale, model.cfg_interval) == (30, 1.5, (0.2, 1.0))
    ema1 = read_checkpoint(checkpoint)["model_ema1"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema1[key]), key
    assert model.ema_params == []  # an export has one weight set: the network's own
    assert Denoiser.from_pretrained(str(folder), cfg=3.0, attn_impl="fp32").cfg_scale == 3.0
    with pytest.raises(TypeError, match="unknown setting 'cfg_scale'"):
        Denoiser.from_pretrained(str(folder), cfg_scale=3.0)


def weight_bytes(model):
    """Bytes of the weights a Denoiser holds: its parameters and its EMA tracks."""
    tensors = list(model.parameters()) + [t for track in model.ema_params for t in track]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_sampling_denoisers_hold_the_weights_once(checkpoint, tmp_path, monkeypatch):
    """A training Denoiser holds its weights three times (live and two EMA tracks); from_pretrained and sample.py, of
    a .pth or an export, build Denoisers without EMA tracks that hold the chosen weights once."""
    trained, _ = tiny_denoiser()
    once = sum(p.numel() * p.element_size() for p in trained.parameters())
    assert weight_bytes(trained) == 3 * once
    folder = tmp_path / "export"
    export.main(["--checkpoint", str(checkpoint), "--out", str(folder)])
    assert weight_bytes(Denoiser.from_pretrained(str(folder))) == once
    held = []
    real_generate = Denoiser.generate
    monkeypatch.setattr(Denoiser, "generate", lambda model, labels, **sampler: held.append(weight_bytes(model))
                        or real_generate(model, labels, **sampler))
    for target, extra in ((checkpoint, ["--ema", "2"]), (checkpoint, ["--ema", "0"]), (folder, [])):
        sample.main(["--checkpoint", str(target), "--classes", "1", "--per_class", "1", "--out",
                     str(tmp_path / "x.png"), *FAST, *extra])
    assert held == [once] * 3


def test_official_checkpoint_without_resume_state_exports(tmp_path):
    """The release's layout: no resume_state, no text_encoder, and an args namespace of the release's flags only
    (no eval_ema, attn_impl, precision, ...): fields it lacks take main_jit.py's defaults."""
    model, _ = tiny_denoiser()
    release_args = argparse.Namespace(model="JiT-T/4", img_size=32, class_num=10, attn_dropout=0.0, proj_dropout=0.0,
                                      P_mean=-0.8, P_std=0.8, noise_scale=2.0, t_eps=0.05, label_drop_prob=0.1,
                                      sampling_method="heun", num_sampling_steps=50, cfg=2.9, interval_min=0.1,
                                      interval_max=1.0, ema_decay1=0.9999, ema_decay2=0.9996, epochs=600)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "model_ema1": model.ema_state_dict(1),
                "model_ema2": model.ema_state_dict(2), "optimizer": {}, "epoch": 599, "args": release_args}, path)
    export.main(["--checkpoint", str(tmp_path), "--ema", "2", "--out", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["noise_scale"], config["cfg"], config["interval_min"]) == (2.0, 2.9, 0.1)
    assert config["weights"] == {"ema_track": 2, "ema_decay": 0.9996, "epoch": 599, "checkpoint": "checkpoint-last.pth"}
    loaded, ema2 = Denoiser.from_pretrained(str(tmp_path / "out")), model.ema_state_dict(2)
    assert all(torch.equal(v, ema2[k]) for k, v in loaded.state_dict().items())


def test_errors_are_one_line_naming_the_file(checkpoint, tmp_path):
    folder = tmp_path / "export"
    export.main(["--checkpoint", str(checkpoint), "--out", str(folder)])

    def sample_error(target, *extra):
        with pytest.raises(SystemExit) as error:
            sample.main(["--checkpoint", str(target), "--classes", "1", "--out", str(tmp_path / "x.png"), *FAST,
                         *extra])
        text = str(error.value)
        assert text.startswith("sample.py: error: ") and "\n" not in text
        return text

    assert "is an exported model holding one weight set" in sample_error(folder, "--ema", "2")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert f"{no_config / 'config.json'}: no such file" in sample_error(no_config)

    wrong = tmp_path / "wrong_shape"
    wrong.mkdir()
    (wrong / "config.json").write_text((folder / "config.json").read_text())
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    tensors["net.final_layer.linear.weight"] = tensors["net.final_layer.linear.weight"][:, :-1].contiguous()
    safetensors.torch.save_file(tensors, wrong / "model.safetensors")
    text = sample_error(wrong)
    assert f"{wrong / 'model.safetensors'}: key net.final_layer.linear.weight has shape (48, 191)" in text
    with pytest.raises(ValueError, match="key net.final_layer.linear.weight has shape"):
        Denoiser.from_pretrained(str(wrong))

    (wrong / "config.json").write_text("{not json")
    assert f"{wrong / 'config.json'}: not a valid JSON file" in sample_error(wrong)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((folder / "config.json").read_text())
    assert f"{config_only / 'model.safetensors'}: no such file" in sample_error(config_only)

    # export errors: no checkpoint, a missing weight set, a model that does not fit the weights
    with pytest.raises(SystemExit) as error:
        export.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "e")])
    assert str(error.value) == f"export.py: error: --checkpoint {tmp_path / 'none'}: no such file or folder"
    bare = tmp_path / "bare.pth"
    torch.save({"model": read_checkpoint(checkpoint)["model"]}, bare)
    with pytest.raises(SystemExit, match="has no 'model_ema1' entry; export the live weights with --ema 0"):
        export.main(["--checkpoint", str(bare), "--model", "JiT-T/4", "--img_size", "32", "--class_num", "10",
                     "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=r"\[model\]: key net.pos_embed has shape \(1, 64, 192\) but this model "
                                         r"expects \(1, 16, 192\)"):
        export.main(["--checkpoint", str(bare), "--ema", "0", "--model", "JiT-T/4", "--img_size", "16",
                     "--class_num", "10", "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()


def test_text_model_round_trip(make_args, tiny_llm_path, tmp_path):
    """A -Text export records the LLM (name, max_text_len, fingerprint) instead of a class count, loads with its
    LLM and samples the .pth's prompts bit for bit; another max_text_len is refused naming config.json."""
    args = make_args("--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path, "--max_text_len", "16")
    torch.manual_seed(0)
    model = Denoiser(args)
    shift_(model.parameters(), 0.05, 4)
    shift_(model.ema_params[0], 0.05, 5)
    ckpt = tmp_path / "text.pth"
    save_checkpoint(str(ckpt), model, torch.optim.AdamW(model.parameters()), 0, args)
    folder = tmp_path / "text_export"
    export.main(["--checkpoint", str(ckpt), "--out", str(folder)])
    config = json.loads((folder / "config.json").read_text())
    assert config["class_num"] is None and config["use_text_conditioning"] is True
    assert (config["llm_model_name"], config["max_text_len"], config["text_conditioning"]) == (tiny_llm_path, 16, "pooled")
    assert config["text_encoder"] == read_checkpoint(ckpt)["text_encoder"]
    assert "net.y_embedder.encoder.proj.weight" in safetensors.torch.load_file(folder / "model.safetensors")

    prompts = ["犬の写真", "a photo of a cat"]
    outs = {}
    for name, target, extra in (("pth", ckpt, ["--ema", "1"]), ("export", folder, [])):
        outs[name] = tmp_path / f"{name}.png"
        sample.main(["--checkpoint", str(target), "--prompts", *prompts, "--per_class", "2", "--text_cache_dir",
                     str(tmp_path / "cache"), "--out", str(outs[name]), *FAST, *extra])
    assert np.array_equal(pixels(outs["pth"]), pixels(outs["export"]))
    with pytest.raises(ValueError, match=f"{folder / 'config.json'}: trained with the caption LLM"):
        Denoiser.from_pretrained(str(folder), max_text_len=8)


def test_command_line(checkpoint, tmp_path):
    out = tmp_path / "cli export"
    result = subprocess.run([sys.executable, "export.py", "--checkpoint", str(checkpoint.parent), "--ema", "2",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "exported JiT-T/4 @ 32px, EMA track 2 (decay 0.9996)" in result.stdout
    assert json.loads((out / "config.json").read_text())["weights"]["ema_track"] == 2
