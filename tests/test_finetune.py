"""--finetune: a new run from the weights of a trained JiT (ours, official, or an export), with another class count,
image size or a text condition where the model allows it; one line on what was loaded, one line on what does not
fit."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import export
from conftest import perturb_, run_main_in_process
from denoiser import Denoiser
from util.args import get_args_parser
from util.checkpoint import read_checkpoint, save_checkpoint
from util.finetune import finetune, fit_weights

TINY = ["--model", "JiT-T/4", "--img_size", "32", "--device", "cpu", "--precision", "fp32"]


def parse(*argv):
    return get_args_parser().parse_args(TINY + [str(a) for a in argv])


@pytest.fixture
def source(tmp_path):
    """checkpoint-last.pth of a 5-class JiT-T/4 whose live weights and two EMA tracks all differ (seed 3)."""
    args = parse("--class_num", 5)
    torch.manual_seed(3)
    model = perturb_(Denoiser(args), seed=3)
    for track, seed in ((1, 4), (2, 5)):
        model.load_ema_state_dict(track, perturb_(Denoiser(args), seed=seed).state_dict())
    path = tmp_path / "source" / "checkpoint-last.pth"
    os.makedirs(path.parent)
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), 41, args)
    return path


def finetuned(argv, capsys=None):
    """A Denoiser for `argv`, filled by finetune() (seed 0 for its own initialisation), and the line it printed."""
    args = parse(*argv)
    torch.manual_seed(0)
    model = Denoiser(args)
    finetune(args, model)
    return model, (capsys.readouterr().out.strip() if capsys else None)


def test_another_class_count_keeps_everything_but_a_new_label_table(source, capsys):
    checkpoint = read_checkpoint(source)
    model, line = finetuned(["--class_num", 10, "--finetune", source.parent], capsys)
    ema1 = checkpoint["model_ema1"]
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "net.y_embedder.embedding_table.weight":
            torch.manual_seed(0)  # the table of a fresh 10-class model of the same seed: initialised as the release
            assert torch.equal(tensor, Denoiser(parse("--class_num", 10)).state_dict()[name])
        else:
            assert torch.equal(tensor, ema1[name]), name  # --finetune_ema 1 by default
    for track in model.ema_params:  # both EMA tracks start from the loaded weights
        assert all(torch.equal(t, p) for t, p in zip(track, model.parameters()))
    assert line == (f"fine-tuning from {source} (EMA track 1): 98 tensors loaded, initialised anew: "
                    f"net.y_embedder.embedding_table.weight 6x192 -> 11x192")


def test_live_weights_another_image_size_and_an_export(source, tmp_path, capsys):
    checkpoint = read_checkpoint(source)
    model, line = finetuned(["--class_num", 5, "--img_size", 64, "--finetune", source, "--finetune_ema", 0], capsys)
    assert torch.equal(model.state_dict()["net.blocks.0.attn.qkv.weight"], checkpoint["model"]["net.blocks.0.attn.qkv.weight"])
    assert line.endswith("(live weights): 98 tensors loaded, initialised anew: net.pos_embed 1x64x192 -> 1x256x192")
    folder = tmp_path / "export"
    export.main(["--checkpoint", str(source), "--ema", "2", "--out", str(folder)])
    capsys.readouterr()
    model, line = finetuned(["--class_num", 5, "--finetune", folder], capsys)
    assert all(torch.equal(tensor, checkpoint["model_ema2"][name]) for name, tensor in model.state_dict().items())
    assert line == f"fine-tuning from {folder} (exported EMA track 2): 99 tensors loaded, none initialised anew"


def test_a_class_model_becomes_a_text_model(source, tiny_llm_path, capsys):
    model, line = finetuned(["--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path, "--finetune", source],
                            capsys)
    ema1 = read_checkpoint(source)["model_ema1"]
    text_keys = ["net.y_embedder.encoder.proj.weight", "net.y_embedder.encoder.proj.bias",
                 "net.y_embedder.null_embedding"]
    assert sorted(key for key in model.state_dict() if key not in ema1) == sorted(text_keys)
    assert all(torch.equal(model.state_dict()[key], ema1[key]) for key in ema1 if key.startswith("net.blocks."))
    assert line.endswith("98 tensors loaded, initialised anew: net.y_embedder.null_embedding none -> 1x192; "
                         "net.y_embedder.encoder.proj.weight none -> 192x32; net.y_embedder.encoder.proj.bias none -> "
                         "192")


def test_what_does_not_fit_is_one_line_naming_the_tensor_and_both_shapes(source):
    with pytest.raises(SystemExit) as info:
        finetuned(["--model", "JiT-T/2", "--class_num", 5, "--finetune", source])
    assert str(info.value) == (f"{source}: net.x_embedder.proj1.weight has shape (32, 3, 4, 4), this model "
                               f"(32, 3, 2, 2): another model config or patch size")
    with pytest.raises(SystemExit, match=r"^--finetune .*nowhere: no such file or folder$"):
        finetuned(["--finetune", source.parent / "nowhere"])
    target = Denoiser(parse("--class_num", 5)).state_dict()
    extra = dict(target, **{"net.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"^x: tensor net.extra.weight \(3,\) has no place in this model"):
        fit_weights(target, extra, "x")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdata")
    rng = np.random.default_rng(9)
    for c in range(3):
        os.makedirs(root / "train" / str(c))
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(root / "train" / str(c) / f"{i}.png")
    return root


def run_main(argv, monkeypatch):
    return run_main_in_process(parse(*argv), monkeypatch)


def test_a_finetuned_run_starts_at_epoch_0_and_resumes_as_its_own(source, image_folder, tmp_path, monkeypatch,
                                                                    capsys):
    """The new run: epoch 0, a fresh AdamW (its step count is this run's), its own checkpoints; launched again with
    --resume on its folder it continues itself and leaves --finetune aside."""
    out = tmp_path / "run"
    flags = ["--class_num", 3, "--data_path", image_folder, "--output_dir", out, "--resume", out, "--finetune", source,
             "--batch_size", 4, "--num_workers", 0, "--warmup_epochs", 0]
    run_main([*flags, "--epochs", 1], monkeypatch)
    assert f"fine-tuning from {source} (EMA track 1)" in capsys.readouterr().out
    first = read_checkpoint(out / "checkpoint-last.pth")
    assert first["epoch"] == 0 and {s["step"].item() for s in first["optimizer"]["state"].values()} == {3.0}
    run_main([*flags, "--epochs", 2], monkeypatch)
    log = capsys.readouterr().out
    assert f"--finetune {source} not used: continuing the run of {out}/checkpoint-last.pth" in log
    assert "fine-tuning from" not in log
    assert {s["step"].item() for s in read_checkpoint(out / "checkpoint-last.pth")["optimizer"]["state"].values()} \
        == {6.0}


def test_finetune_is_refused_for_evaluation(source, tmp_path):
    from util.args import check_config
    with pytest.raises(SystemExit, match=r"--evaluate_gen trains nothing; evaluate a checkpoint with --resume$"):
        check_config(parse("--finetune", source, "--evaluate_gen", "--output_dir", tmp_path, "--num_images", 1000))
