"""sample.py: grids and individual PNGs from a checkpoint, EMA track choice, saved args with overrides, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import util.checkpoint
from denoiser import Denoiser
from util.args import get_args_parser
from util.checkpoint import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_sampling_steps", "2", "--sampling_method", "euler", "--device", "cpu", "--precision", "fp32"]


@torch.no_grad()
def shift_(params, std, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A JiT-T/4 checkpoint at 32 px, 10 classes, whose live weights, EMA 1 and EMA 2 all differ (the zero-initialised
    output layers are perturbed so that samples depend on the weights)."""
    args = get_args_parser().parse_args(["--model", "JiT-T/4", "--img_size", "32", "--class_num", "10",
                                         "--device", "cpu", "--eval_ema", "2"])
    torch.manual_seed(0)
    model = Denoiser(args)
    shift_(model.parameters(), 0.05, 1)
    shift_(model.ema_params[0], 0.05, 2)
    shift_(model.ema_params[1], 0.05, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(str(folder / "checkpoint-last.pth"), model, optimizer, 3, args)
    return folder


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_grid_one_row_per_class(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    sample.main(["--checkpoint", str(checkpoint), "--classes", "0,3,9", "--per_class", "4", "--out", str(out), *FAST])
    # torchvision's grid: 2-pixel padding around and between 32 px cells
    assert Image.open(out).size == (4 * 34 + 2, 3 * 34 + 2)
    assert "12-image grid (4 columns)" in capsys.readouterr().out


def test_default_grid_shows_every_class_of_a_small_model(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(["--checkpoint", str(checkpoint / "checkpoint-last.pth"), "--per_class", "2", "--out", str(out),
                 *FAST])
    assert Image.open(out).size == (2 * 34 + 2, 10 * 34 + 2)


def test_individual_pngs(checkpoint, tmp_path):
    out = tmp_path / "pngs"
    sample.main(["--checkpoint", str(checkpoint), "--classes", "1,2", "--num_images", "5", "--out", str(out), *FAST])
    names = sorted(os.listdir(out))
    assert names == ["0000_class1.png", "0001_class2.png", "0002_class1.png", "0003_class2.png", "0004_class1.png"]
    image = Image.open(out / names[0])
    assert image.size == (32, 32) and image.mode == "RGB"


def test_ema_choice_changes_the_images(checkpoint, tmp_path):
    paths = {}
    for ema in ("0", "1", "2"):
        paths[ema] = tmp_path / f"ema{ema}.png"
        sample.main(["--checkpoint", str(checkpoint), "--classes", "5", "--per_class", "2", "--ema", ema,
                     "--out", str(paths[ema]), *FAST])
    images = {ema: pixels(path) for ema, path in paths.items()}
    assert not np.array_equal(images["0"], images["1"])
    assert not np.array_equal(images["1"], images["2"])
    # the default is the checkpoint's --eval_ema (2 here); same seed -> same images
    default = tmp_path / "default.png"
    sample.main(["--checkpoint", str(checkpoint), "--classes", "5", "--per_class", "2", "--out", str(default), *FAST])
    assert np.array_equal(pixels(default), images["2"])


def test_saved_args_are_overridden_by_flags(checkpoint, monkeypatch):
    seen = {}
    monkeypatch.setattr(sample, "save_grid", lambda images, path, captions=None, nrow=8: seen.update(n=len(images)))
    real_generate = Denoiser.generate

    def spy(model, labels, **sampler):
        assert all(v is None for k, v in sampler.items() if k != "on_step")  # the flags are the model's settings
        seen.update(cfg=model.cfg_scale, interval=model.cfg_interval, steps=model.num_sampling_steps,
                    method=model.sampling_method, labels=labels.tolist())
        return real_generate(model, labels, **sampler)

    monkeypatch.setattr(Denoiser, "generate", spy)
    reads = []
    real_read = util.checkpoint.read_checkpoint
    monkeypatch.setattr(util.checkpoint, "read_checkpoint", lambda path: reads.append(path) or real_read(path))
    sample.main(["--checkpoint", str(checkpoint), "--classes", "7", "--per_class", "3", "--cfg", "2.5",
                 "--interval_min", "0.1", "--num_sampling_steps", "3", "--sampling_method", "heun",
                 "--device", "cpu", "--out", "unused.png"])
    assert seen == {"cfg": 2.5, "interval": (0.1, 1.0), "steps": 3, "method": "heun", "labels": [7, 7, 7], "n": 3}
    assert len(reads) == 1  # the checkpoint is read once: its args, then its weights from the same dict


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{missing}"], "--checkpoint {missing}: no such file or folder"),
    (["--checkpoint", "{empty}"], "has no checkpoint-last.pth"),
    (["--checkpoint", "{ckpt}", "--classes", "0,10"], "class index 10 is out of range; this checkpoint has "
                                                      "class_num 10 (valid classes 0..9)"),
    (["--checkpoint", "{ckpt}", "--classes", "a,b"], "expected comma-separated class indices"),
    (["--checkpoint", "{ckpt}", "--prompts", "手書きの数字3"], "is a class-conditional model (JiT-T/4, class_num 10): "
                                                            "--prompts and --prompts_file need a -Text checkpoint"),
])
def test_errors_are_one_line(checkpoint, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    fill = {"missing": str(tmp_path / "nope.pth"), "empty": str(tmp_path / "empty"), "ckpt": str(checkpoint)}
    argv = [a.format(**fill) for a in argv]
    with pytest.raises(SystemExit) as error:
        sample.main(argv + ["--out", str(tmp_path / "x.png"), *FAST])
    text = str(error.value)
    assert text.startswith("sample.py: error: ") and "\n" not in text
    assert message.format(**fill) in text
    assert not (tmp_path / "x.png").exists()


def test_command_line(checkpoint, tmp_path):
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(checkpoint), "--classes", "4",
                             "--per_class", "2", "--out", str(out), *FAST], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote a 2-image grid" in result.stdout and "EMA track 2" in result.stdout
    assert Image.open(out).size == (2 * 34 + 2, 34 + 2)
    bad = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "none.pth")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip() == f"sample.py: error: --checkpoint {tmp_path / 'none.pth'}: no such file or folder"


def test_text_model_prompts(make_args, tiny_llm_path, tmp_path):
    """A -Text checkpoint (tiny local LLM): prompts in Japanese and English -> one grid row per prompt and the
    caption list beside the grid; --classes is refused."""
    args = make_args("--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path)
    torch.manual_seed(0)
    model = Denoiser(args)
    shift_(model.parameters(), 0.05, 4)
    ckpt = tmp_path / "text.pth"
    save_checkpoint(str(ckpt), model, torch.optim.AdamW(model.parameters()), 0, args)
    out = tmp_path / "prompts.png"
    sample.main(["--checkpoint", str(ckpt), "--prompts", "犬の写真", "a photo of a cat", "--per_class", "2",
                 "--text_cache_dir", str(tmp_path / "cache"), "--out", str(out), *FAST])
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)
    assert (tmp_path / "prompts.txt").read_text(encoding="utf-8").splitlines() == [
        "row 0 col 0: 犬の写真", "row 0 col 1: 犬の写真", "row 1 col 0: a photo of a cat", "row 1 col 1: a photo of a cat"]
    folder = tmp_path / "pngs"
    sample.main(["--checkpoint", str(ckpt), "--prompts", "猫の写真", "--num_images", "2",
                 "--text_cache_dir", str(tmp_path / "cache"), "--out", str(folder), *FAST])
    assert sorted(os.listdir(folder)) == ["0000_prompt0.png", "0001_prompt0.png", "prompts.txt"]
    with pytest.raises(SystemExit, match="is a text-to-image model .*give --prompts or --prompts_file"):
        sample.main(["--checkpoint", str(ckpt), "--classes", "0", "--out", str(tmp_path / "x.png"), *FAST])


def grid_cells(path, rows, cols, size=32, pad=2):
    """The (rows x cols) images of a torchvision grid PNG (2-pixel padding), row by row, as (size, size, 3) arrays."""
    grid = pixels(path)
    return [grid[pad + r * (size + pad):pad + r * (size + pad) + size, pad + c * (size + pad):pad + c * (size + pad) + size]
            for r in range(rows) for c in range(cols)]


def test_grid_cells_are_the_generated_images(checkpoint, tmp_path):
    """Each grid cell is exactly what Denoiser.generate draws for its label with the seed (checked independently of
    sample.py: the checkpoint loaded here, EMA 2, the noise of seed 0 for the whole batch), and the grid of
    --num_images holds the same images as the PNGs of the folder output, in order."""
    from util.images import to_uint8
    from util.checkpoint import load_checkpoint, read_checkpoint

    out = tmp_path / "grid.png"
    sample.main(["--checkpoint", str(checkpoint), "--classes", "0,3,9", "--per_class", "2", "--out", str(out), *FAST])
    args = read_checkpoint(checkpoint / "checkpoint-last.pth")["args"]
    args.num_sampling_steps, args.sampling_method = 2, "euler"
    model = Denoiser(args)
    path = str(checkpoint / "checkpoint-last.pth")
    load_checkpoint(model, path, read_checkpoint(path))
    model.eval()
    torch.manual_seed(0)
    with model.ema_weights(2):
        expected = to_uint8(model.generate(torch.tensor([0, 0, 3, 3, 9, 9]))).permute(0, 2, 3, 1).numpy()
    cells = grid_cells(out, 3, 2)
    for cell, image in zip(cells, expected, strict=True):
        assert np.array_equal(cell, image)
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[0], cells[2])  # not one image 6 times

    sample.main(["--checkpoint", str(checkpoint), "--classes", "1,2", "--num_images", "4", "--out", str(out), *FAST])
    folder = tmp_path / "pngs"
    sample.main(["--checkpoint", str(checkpoint), "--classes", "1,2", "--num_images", "4", "--out", str(folder), *FAST])
    names = sorted(os.listdir(folder))
    assert names == ["0000_class1.png", "0001_class2.png", "0002_class1.png", "0003_class2.png"]
    for cell, name in zip(grid_cells(out, 2, 2), names, strict=True):  # --num_images: one column per class
        assert np.array_equal(cell, pixels(folder / name))


@pytest.fixture(scope="module")
def official_checkpoint(checkpoint, tmp_path_factory):
    """The fixture's checkpoint in the release's layout without `args` (as an official file may come)."""
    ckpt = torch.load(checkpoint / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    path = tmp_path_factory.mktemp("official") / "jit-t-4.pth"
    torch.save({key: ckpt[key] for key in ("model", "model_ema1", "model_ema2", "optimizer", "epoch")}, path)
    return path


def test_checkpoint_without_args_samples_with_model_flags(checkpoint, official_checkpoint, tmp_path):
    ours, official = tmp_path / "ours.png", tmp_path / "official.png"
    common = ["--classes", "2,7", "--per_class", "2", "--ema", "2", *FAST]
    sample.main(["--checkpoint", str(checkpoint), "--out", str(ours), *common])
    sample.main(["--checkpoint", str(official_checkpoint), "--model", "JiT-T/4", "--img_size", "32",
                 "--class_num", "10", "--out", str(official), *common])
    assert np.array_equal(pixels(official), pixels(ours))


@pytest.mark.parametrize("given, missing", [
    ([], "--model, --img_size, --class_num"),
    (["--model", "JiT-T/4", "--img_size", "32"], "--class_num"),
    (["--model", "JiT-T/4", "--class_num", "10"], "--img_size"),
])
def test_checkpoint_without_args_names_the_missing_flag(official_checkpoint, tmp_path, given, missing):
    with pytest.raises(SystemExit) as error:
        sample.main(["--checkpoint", str(official_checkpoint), *given, "--out", str(tmp_path / "x.png"), *FAST])
    assert str(error.value) == (f"sample.py: error: {official_checkpoint} has no saved 'args' (an official "
                                f"checkpoint?): give {missing}")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("class_num, expected", [
    (1000, [207, 360, 387, 974, 88, 979, 417, 279]),  # the showcase classes of the DiT/JiT figures
    (20, [0, 3, 5, 8, 11, 14, 16, 19]),  # no showcase list: 8 classes spread over the range
])
def test_default_classes_of_a_large_model(tmp_path, monkeypatch, class_num, expected):
    args = get_args_parser().parse_args(["--model", "JiT-T/4", "--img_size", "32", "--class_num", str(class_num),
                                         "--device", "cpu"])
    model = Denoiser(args)
    save_checkpoint(str(tmp_path / "big.pth"), model, torch.optim.AdamW(model.parameters()), 0, args)
    seen = []
    monkeypatch.setattr(Denoiser, "generate", lambda model, labels, **sampler: seen.extend(labels.tolist())
                        or torch.zeros(len(labels), 3, 32, 32))
    sample.main(["--checkpoint", str(tmp_path / "big.pth"), "--per_class", "2", "--out", str(tmp_path / "g.png"), *FAST])
    assert seen == [c for c in expected for _ in range(2)]


def test_prompts_file_equals_prompts_on_the_command_line(make_args, tiny_llm_path, tmp_path):
    """--prompts_file (one caption per line, surrounding spaces ignored) draws what --prompts draws; a blank line
    stops with one line naming the file and the line (it would shift every later prompt's row)."""
    args = make_args("--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path)
    torch.manual_seed(0)
    model = Denoiser(args)
    shift_(model.parameters(), 0.05, 5)
    ckpt = tmp_path / "text.pth"
    save_checkpoint(str(ckpt), model, torch.optim.AdamW(model.parameters()), 0, args)
    prompts = tmp_path / "prompts_in.txt"
    prompts.write_text("犬の写真\n  a photo of a cat \n", encoding="utf-8")
    common = ["--checkpoint", str(ckpt), "--per_class", "2", "--text_cache_dir", str(tmp_path / "cache"), *FAST]
    sample.main([*common, "--prompts_file", str(prompts), "--out", str(tmp_path / "file.png")])
    sample.main([*common, "--prompts", "犬の写真", "a photo of a cat", "--out", str(tmp_path / "cli.png")])
    assert np.array_equal(pixels(tmp_path / "file.png"), pixels(tmp_path / "cli.png"))
    assert (tmp_path / "file.txt").read_text(encoding="utf-8").splitlines() == [
        "row 0 col 0: 犬の写真", "row 0 col 1: 犬の写真", "row 1 col 0: a photo of a cat", "row 1 col 1: a photo of a cat"]
    blank = tmp_path / "blank.txt"
    blank.write_text("犬の写真\n\na photo of a cat\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"^sample.py: error: --prompts_file {blank}: line 2 is blank"):
        sample.main([*common, "--prompts_file", str(blank), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=r"^sample.py: error: --prompts_file .*nope.txt: .*No such file"):
        sample.main([*common, "--prompts_file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x.png")])


def test_text_checkpoint_without_cfg_uses_the_readme_guidance(make_args, tiny_llm_path, tmp_path, monkeypatch, capsys):
    """A -Text run saves the unguided training default cfg 1.0: sample.py without --cfg draws with the README's text
    evaluation guidance (CFG 3.0 on t > 0.1) and says so; --cfg 1, or a cfg the run chose itself, is kept."""
    args = make_args("--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path)
    torch.manual_seed(0)
    model = Denoiser(args)
    ckpt = tmp_path / "text.pth"
    save_checkpoint(str(ckpt), model, torch.optim.AdamW(model.parameters()), 0, args)
    args.cfg = 2.0
    chosen = tmp_path / "text_cfg2.pth"
    save_checkpoint(str(chosen), model, torch.optim.AdamW(model.parameters()), 0, args)
    seen = []
    real_generate = Denoiser.generate

    def spy(model, labels, **sampler):
        seen.append((model.cfg_scale, tuple(model.cfg_interval)))
        return real_generate(model, labels, **sampler)

    monkeypatch.setattr(Denoiser, "generate", spy)
    common = ["--prompts", "犬の写真", "--per_class", "1", "--text_cache_dir", str(tmp_path / "cache"), *FAST]
    sample.main(["--checkpoint", str(ckpt), *common, "--out", str(tmp_path / "a.png")])
    assert seen[-1] == (3.0, (0.1, 1.0))
    assert "-Text checkpoint, no --cfg: CFG 3 for t in (0.1, 1)" in capsys.readouterr().out
    sample.main(["--checkpoint", str(ckpt), *common, "--cfg", "1", "--out", str(tmp_path / "b.png")])
    assert seen[-1][0] == 1.0
    sample.main(["--checkpoint", str(chosen), *common, "--out", str(tmp_path / "c.png")])
    assert seen[-1][0] == 2.0
    assert "no --cfg" not in capsys.readouterr().out
