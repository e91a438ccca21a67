"""-Text models end to end with a tiny local LLM, in both conditioning modes (pooled, tokens): caption store, CFG
null, frozen LLM untouched, checkpoints without the LLM, sampling from prompts, main_jit.py training and evaluation on
an images/ + captions/ folder."""
import argparse
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from denoiser import Denoiser
from util.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["赤い丸の写真", "青い四角の写真", "a green triangle", "黄色い星の写真"]


@pytest.fixture
def text_args(make_args, tiny_llm_path):
    def make(*extra):
        return make_args("--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path, *extra)
    return make


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Caption stores of these tests go to a temporary folder, never the user's ~/.cache/jit."""
    monkeypatch.setenv("JIT_CACHE_DIR", str(tmp_path / "jit_cache"))


def with_captions(model, captions=CAPTIONS):
    model.net.y_embedder.use_captions(captions, show_progress=False)  # the store under $JIT_CACHE_DIR (default_root)
    return model


def test_text_model_keys_and_no_llm_in_the_network(text_args, tiny_llm_path, llm_loads):
    torch.manual_seed(0)
    model = with_captions(Denoiser(text_args("--label_drop_prob", "0.5")))
    assert len(llm_loads.loads) == 1 and llm_loads.models[0]() is None  # loaded to embed, then released
    keys = list(model.state_dict())
    assert not any("llm" in k for k in keys)
    assert {k for k in keys if k.startswith("net.y_embedder.")} == {
        "net.y_embedder.null_embedding", "net.y_embedder.encoder.proj.weight", "net.y_embedder.encoder.proj.bias"}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(3):
        loss = model(x, torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_ema()
    assert torch.isfinite(loss) and len(llm_loads.loads) == 1 and not llm_loads.calls[1:]  # one embedding batch
    # EMA tracks hold exactly the JiT's tensors (one per parameter, as many numbers), none of the LLM's
    jit_numel = sum(v.numel() for k, v in model.state_dict().items() if "llm" not in k)
    assert [t.shape for t in model.ema_params[0]] == [p.shape for p in model.parameters()]
    assert sum(t.numel() for t in model.ema_params[0]) == sum(t.numel() for t in model.ema_params[1]) == jit_numel


@pytest.mark.parametrize("mode, qkv_sumsq, rand_after", [
    ("pooled", 287.7427375333567, [0.5712339878082275, 0.3199480175971985, 0.653168261051178]),
    ("tokens", 288.3608444611483, [0.4455164670944214, 0.3748289942741394, 0.5343579053878784])])
def test_text_init_for_a_seed_is_unchanged(text_args, mode, qkv_sumsq, rand_after):
    """Seed 0 gives a -Text Denoiser the weights the code before CaptionLLM gave it (the frozen LLM was then loaded
    at construction): sums of squares and the next draws measured with that code and this tiny LLM (width 32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Denoiser(text_args("--text_conditioning", mode))
        assert torch.rand(3).tolist() == rand_after
    sumsq = {k: v.double().square().sum().item() for k, v in model.state_dict().items()}
    assert sumsq["net.y_embedder.encoder.proj.weight"] == pytest.approx(55.127323900913126, rel=1e-9)
    assert sumsq["net.y_embedder.null_embedding"] == pytest.approx(0.07187618141298827, rel=1e-9)
    assert sumsq["net.blocks.0.attn.qkv.weight"] == pytest.approx(qkv_sumsq, rel=1e-9)
    if mode == "tokens":
        assert sumsq["net.y_embedder.token_proj.weight"] == pytest.approx(55.768792999045885, rel=1e-9)


def test_text_init_differs_from_the_class_init_of_the_same_seed(text_args, make_args):
    """What JiT's docstring says of -Text initial weights: the text projection is drawn before the network, so every
    random tensor of the body differs from the class model's of the same seed; only the fixed tables agree."""
    models = {}
    for kind, args, seed in (("text", text_args(), 0), ("class", make_args(), 0), ("class seed 1", make_args(), 1)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models[kind] = Denoiser(args).state_dict()
    text, body = models["text"], [k for k in models["class"] if not k.startswith("net.y_embedder.")]
    drawn = {k for k in body if not torch.equal(models["class"][k], models["class seed 1"][k])}
    assert len(drawn) == 29  # JiT-T/4: patch embedding x2, t MLP x2, in-context tokens, 4 linears x 6 blocks
    assert {k for k in body if torch.equal(models["class"][k], text[k])} == set(body) - drawn


def test_condition_is_projected_cached_features_and_null_is_learned(text_args):
    model = with_captions(Denoiser(text_args()))
    embedder = model.net.y_embedder
    with embedder.caption_llm.loaded("cpu"):
        on_the_fly = embedder.caption_llm.pooled_features([CAPTIONS[2]])
    emb = embedder(torch.tensor([2, -1]))
    # the store keeps float16 rows: the projection of the float16 rounding of the pooled features
    torch.testing.assert_close(emb[0], embedder.encoder.proj(on_the_fly.half().float())[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(emb[1], embedder.null_embedding[0])
    assert emb[1].abs().sum() > 0  # N(0, 0.02) init, not an all-zero input to the LLM


def test_cfg_drop_replaces_captions_with_null(text_args, monkeypatch):
    model = with_captions(Denoiser(text_args("--label_drop_prob", "0.5")))
    seen = []
    forward = model.net.forward
    monkeypatch.setattr(model.net, "forward", lambda z, t, y: seen.append(y.clone()) or forward(z, t, y))
    torch.manual_seed(3)
    model(torch.zeros(64, 3, 32, 32), torch.arange(64) % 4)
    dropped = (seen[0] == -1).sum().item()
    assert 16 <= dropped <= 48 and ((seen[0] == -1) | (seen[0] == torch.arange(64) % 4)).all()
    model.eval()
    model(torch.zeros(8, 3, 32, 32), torch.arange(8) % 4)
    assert (seen[1] >= 0).all()  # no drop outside training


def test_sampling_from_prompts_runs_the_llm_only_once_per_prompt(text_args, llm_loads):
    model = Denoiser(text_args("--cfg", "2.0", "--num_sampling_steps", "4")).eval()
    calls = llm_loads.calls
    prompts = ["猫の写真", "犬の写真"]
    with_captions(model, prompts)
    assert len(calls) == 1  # both prompts embedded in one batch
    torch.manual_seed(0)
    images = model.generate(torch.tensor([0, 1, 1]))
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()
    assert len(calls) == 1  # 7 network evaluations x 2 (cond + null), no LLM call


def test_trainable_llm_runs_in_the_step(text_args):
    model = Denoiser(text_args("--no-freeze_llm"))
    model.net.y_embedder.set_captions(CAPTIONS)  # no features: the LLM embeds the captions in every step
    assert any(k.startswith("net.y_embedder.encoder.llm.") for k in model.state_dict())
    with torch.no_grad():  # leave the zero init, which blocks every gradient upstream of the output layer
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model(torch.zeros(2, 3, 32, 32), torch.tensor([0, 3])).backward()
    grads = [p.grad for p in model.net.y_embedder.encoder.llm.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_checkpoint_records_the_llm_and_holds_none_of_it(text_args, make_args, tmp_path):
    model = with_captions(Denoiser(text_args()))
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(path, model, optimizer, 0, text_args())
    ckpt = read_checkpoint(path)
    assert ckpt["text_encoder"] == model.net.y_embedder.caption_llm.fingerprint()
    for key in ("model", "model_ema1", "model_ema2"):
        assert list(ckpt[key]) == list(model.state_dict())
    class_path = tmp_path / "class.pth"
    class_model = Denoiser(make_args())
    save_checkpoint(class_path, class_model, torch.optim.AdamW(class_model.parameters()), 0, make_args())
    assert os.path.getsize(path) < 1.05 * os.path.getsize(class_path)  # about the JiT alone

    reloaded = Denoiser(text_args())
    load_checkpoint(reloaded, path, read_checkpoint(path))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match=r"trained with the caption LLM .*max_text_len=77.* but this model uses "
                                         r".*max_text_len=16"):
        load_checkpoint(Denoiser(text_args("--max_text_len", "16")), path, read_checkpoint(path))


@pytest.fixture
def caption_folder(tmp_path):
    """<root>/images/*.png + <root>/captions/*.txt: 8 images, 4 distinct Japanese / English captions."""
    root = tmp_path / "captioned"
    os.makedirs(root / "images")
    os.makedirs(root / "captions")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(root / "images" / f"{i:02d}.png")
        (root / "captions" / f"{i:02d}.txt").write_text(CAPTIONS[i % 4] + "\n", encoding="utf-8")
    return root


def test_text_evaluation_requires_fid_stats_and_the_named_command_makes_them(caption_folder, make_args, tmp_path,
                                                                           monkeypatch):
    import prepare_ref
    from util.args import check_config
    from util import fid
    from util.crop import center_crop_arr
    from util.data import load_rgb
    os.makedirs(caption_folder / "images" / "sub")  # a nested pair is a training image too; captions/ holds none
    Image.new("RGB", (40, 40), (9, 9, 9)).save(caption_folder / "images" / "sub" / "n.png")
    (caption_folder / "captions" / "sub").mkdir()
    (caption_folder / "captions" / "sub" / "n.txt").write_text("a gray square", encoding="utf-8")
    Image.new("RGB", (40, 40), (250, 0, 0)).save(caption_folder / "captions" / "stray.png")
    for flag in ("--online_eval", "--evaluate_gen"):
        with pytest.raises(SystemExit) as info:
            check_config(make_args("--model", "JiT-T/4-Text", "--data_path", str(caption_folder), flag,
                                   "--output_dir", str(tmp_path / "out")))
        message = str(info.value)
        assert "\n" not in message and message.startswith("--fid_stats: a -Text model is measured against its own")
    command = message.split("with python prepare_ref.py ")[1].split(", then")[0]
    assert command == f"--data_path {caption_folder} --img_size 32 --stats_out <file>.npz"

    stats = tmp_path / "stats.npz"
    monkeypatch.setattr(fid, "load_inception", lambda *a: argparse.Namespace(source="stub"))
    monkeypatch.setattr(fid, "inception_features", lambda net, batch, bs: (batch.flatten(1)[:, :2048].double(), None))
    prepare_ref.main(prepare_ref.get_args_parser().parse_args(
        shlex.split(command.replace("<file>.npz", str(stats))) + ["--num_workers", "0", "--device", "cpu"]))
    files = sorted(str(p) for p in (caption_folder / "images").rglob("*.png"))
    assert len(files) == 9  # the 8 images and the nested one, not captions/stray.png
    crops = np.stack([np.asarray(center_crop_arr(load_rgb(f), 32)).transpose(2, 0, 1).reshape(-1)[:2048] for f in files])
    np.testing.assert_allclose(fid.load_stats(str(stats))["mu"], crops.mean(0))
    args = make_args("--model", "JiT-T/4-Text", "--data_path", str(caption_folder), "--online_eval",
                     "--fid_stats", str(stats), "--output_dir", str(tmp_path / "out"))
    check_config(args)  # accepted
    assert args.fid_stats == str(stats)


def test_default_eval_prompts_are_a_seeded_sample_written_beside_the_results(caption_folder, text_args, tmp_path,
                                                                           monkeypatch, capsys):
    import engine_jit
    from main_jit import load_fid_stats
    from util.args import check_config
    from util.datasets import build_dataset, sample_eval_prompts, setup_captions
    from util import fid
    stats, out = tmp_path / "stats.npz", tmp_path / "out"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    args = text_args("--data_path", str(caption_folder), "--online_eval", "--fid_stats", str(stats), "--output_dir",
                     str(out), "--num_images", "10", "--seed", "3", "--save_png", "--num_sampling_steps", "1",
                     "--gen_bsz", "5", "--max_text_len", "4")
    check_config(args)
    ref_stats = load_fid_stats(args)
    dataset = build_dataset(args, text=True)
    model = Denoiser(args)
    eval_ids = setup_captions(args, model, dataset)
    captions = model.net.y_embedder.captions
    printed = capsys.readouterr().out
    assert "of 4 captions have more than --max_text_len 4 tokens (the longest" in printed
    assert "4 distinct captions, 8 evaluation prompts (captions of random training images, --seed 3)" in printed
    # 10 images wanted, 8 training images: every image's caption once, in a seeded order (each caption is on two
    # images, so it is drawn twice: the prompts follow the data set's caption frequencies, as its FID reference)
    assert sorted(eval_ids) == sorted(label for _, label in dataset.samples) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert eval_ids == sample_eval_prompts(dataset, 10, 3) != sample_eval_prompts(dataset, 10, 4)
    assert eval_ids != [label for _, label in dataset.samples]  # not the file-name order
    five = sample_eval_prompts(dataset, 5, 3)
    assert len(five) == 5 and five == sample_eval_prompts(dataset, 5, 3)
    assert (out / "eval_prompts.txt").read_text(encoding="utf-8").splitlines() == [captions[i] for i in eval_ids]

    monkeypatch.setattr(fid, "inception_features", lambda net, images: (torch.randn(len(images), 2048), None))
    monkeypatch.setattr(fid, "fid_from_stats", lambda stats1, stats2: 12.5)  # skip a 2048-d eigvals
    guidance = []
    real_generate = Denoiser.generate
    monkeypatch.setattr(Denoiser, "generate", lambda model, labels, **sampler: guidance.append(
        (sampler["cfg"], model.cfg_scale)) or real_generate(model, labels, **sampler))
    engine_jit.evaluate(model, args, 0, None, torch.device("cpu"), argparse.Namespace(source="stub"),
                       ref_stats, eval_ids, cfg=2.0)  # the scale goes to generate(); the model's stays
    assert guidance == [(2.0, 1.0), (2.0, 1.0)] and model.cfg_scale == 1.0
    engine_jit.evaluate(model, args, 0, None, torch.device("cpu"), argparse.Namespace(source="stub"),
                       ref_stats, eval_ids)
    assert guidance[-1] == (1.0, 1.0)  # --cfg
    png_dir = out / "images_epoch0_cfg1_ema1"
    names = [f"{n:06d}_prompt{n % 8}.png" for n in range(10)]  # image n is drawn for prompt n % 8
    assert sorted(os.listdir(png_dir)) == names + ["prompts.txt"]
    assert (png_dir / "prompts.txt").read_text(encoding="utf-8").splitlines() == [
        f"{name}: {captions[eval_ids[n % 8]]}" for n, name in enumerate(names)]


@pytest.mark.slow
def test_main_trains_and_evaluates_a_text_model(caption_folder, tiny_llm_path, tmp_path):
    from util import fid
    out = tmp_path / "out"
    env = dict(os.environ, JIT_CACHE_DIR=str(tmp_path / "cache"))
    common = [sys.executable, "main_jit.py", "--model", "JiT-T/4-Text", "--img_size", "32", "--device", "cpu",
              "--llm_model_name", tiny_llm_path, "--data_path", str(caption_folder), "--output_dir", str(out),
              "--num_workers", "0", "--batch_size", "4"]
    result = subprocess.run(common + ["--epochs", "2", "--warmup_epochs", "1", "--log_freq", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "4 distinct captions, 8 evaluation prompts (captions of random training images, --seed 0)" in result.stdout
    assert len(os.listdir(tmp_path / "cache" / "text_features")) == 1
    ckpt = read_checkpoint(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and not any("llm" in k for k in ckpt["model"])

    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("白い猫\nred car\n", encoding="utf-8")
    result = subprocess.run(common + ["--evaluate_gen", "--resume", str(out), "--prompts_file", str(prompts),
                                      "--num_images", "4", "--gen_bsz", "4", "--num_sampling_steps", "2",
                                      "--cfg", "2.0", "--fid_stats", str(stats)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "FID" in result.stdout + result.stderr
    grid_txt = (out / "samples_epoch1_cfg2_ema1.txt").read_text(encoding="utf-8").splitlines()
    assert grid_txt == ["row 0 col 0: 白い猫", "row 0 col 1: red car", "row 0 col 2: 白い猫", "row 0 col 3: red car"]


# ================================================================== sampling follows the prompt, both modes
@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_different_prompts_give_different_samples(text_args, perturb, mode):
    """Same noise (same seed), prompts [A, B] against [A, A]: row 0 agrees, row 1 changes with its prompt."""
    model = with_captions(perturb(Denoiser(text_args("--text_conditioning", mode, "--cfg", "2.0",
                                                     "--num_sampling_steps", "3", "--attn_impl", "fp32"))).eval())
    torch.manual_seed(0)
    a_b = model.generate(torch.tensor([0, 1]))
    torch.manual_seed(0)
    a_a = model.generate(torch.tensor([0, 0]))
    torch.testing.assert_close(a_b[0], a_a[0], rtol=1e-5, atol=1e-5)
    assert (a_b[1] - a_a[1]).abs().max() > 1e-3


# ================================================================== per-token conditioning (--text_conditioning tokens)
def token_lengths(model, captions):
    return model.net.y_embedder.caption_llm.tokenize(captions)["attention_mask"].sum(1).tolist()


def test_tokens_model_keys_shapes_and_null_sequence(text_args):
    model = with_captions(Denoiser(text_args("--text_conditioning", "tokens")))
    embedder, D = model.net.y_embedder, 192
    assert {k for k in model.state_dict() if k.startswith("net.y_embedder.")} == {
        "net.y_embedder.null_embedding", "net.y_embedder.encoder.proj.weight", "net.y_embedder.encoder.proj.bias",
        "net.y_embedder.token_proj.weight", "net.y_embedder.token_proj.bias", "net.y_embedder.token_posemb",
        "net.y_embedder.null_token"}
    assert embedder.token_posemb.shape == (1, 77, D) and embedder.null_token.shape == (1, 1, D)
    lengths = token_lengths(model, CAPTIONS)
    assert len(set(lengths)) > 1
    emb, tokens, mask = embedder(torch.tensor([0, -1, 2]))
    T = max(lengths[0], lengths[2])
    assert emb.shape == (3, D) and tokens.shape == (3, T, D) and mask.shape == (3, T) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [lengths[0], 1, lengths[2]]
    # the null caption: the learned null vector for adaLN and a one-token learned null sequence
    assert torch.equal(emb[1], embedder.null_embedding[0]) and torch.equal(tokens[1, 0], embedder.null_token[0, 0])
    # a real caption: its stored token rows, projected, plus their positions; the pooled vector is their mean
    rows = embedder.store.read(embedder._locations[[2]])[0].float()
    torch.testing.assert_close(tokens[2, :lengths[2]], embedder.token_proj(rows) + embedder.token_posemb[0, :lengths[2]])
    torch.testing.assert_close(emb[2], embedder.encoder.proj(rows.mean(0)))


def test_tokens_cfg_drop_uses_the_null_sequence(text_args, monkeypatch):
    model = with_captions(Denoiser(text_args("--text_conditioning", "tokens", "--label_drop_prob", "1.0")))
    embedder = model.net.y_embedder
    seen = []
    forward = embedder.forward
    monkeypatch.setattr(embedder, "forward", lambda ids: seen.append(forward(ids)) or seen[-1])
    model(torch.zeros(4, 3, 32, 32), torch.arange(4))
    emb, tokens, mask = seen[0]
    assert mask.sum(1).tolist() == [1, 1, 1, 1] and tokens.shape[1] == 1
    assert all(torch.equal(tokens[i, 0], embedder.null_token[0, 0]) for i in range(4))
    assert all(torch.equal(emb[i], embedder.null_embedding[0]) for i in range(4))


@pytest.mark.parametrize("attn_impl", ["sdpa", "fp32"])
def test_tokens_padding_does_not_change_the_output(text_args, perturb, attn_impl):
    """A caption batched with a longer one (so padded) gives the network output it gives alone, in fp32."""
    model = with_captions(perturb(Denoiser(text_args("--text_conditioning", "tokens", "--attn_impl", attn_impl))))
    model.eval()
    lengths = token_lengths(model, CAPTIONS)
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    torch.manual_seed(0)
    z, t = torch.randn(1, 3, 32, 32), torch.tensor([0.3])
    with torch.no_grad():
        alone = model.net(z, t, torch.tensor([short]))
        padded = model.net(z.repeat(2, 1, 1, 1), t.repeat(2), torch.tensor([short, long]))
        assert model.net.y_embedder(torch.tensor([short, long]))[2][0].sum() == min(lengths)  # padding present
        with_null = model.net(z.repeat(2, 1, 1, 1), t.repeat(2), torch.tensor([-1, long]))
        null_alone = model.net(z, t, torch.tensor([-1]))
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_null[0], null_alone[0], rtol=1e-6, atol=1e-6)
    assert (padded[1] - padded[0]).abs().max() > 1e-3  # and the caption matters


def test_tokens_checkpoint_round_trip_and_mode_is_recorded(text_args, perturb, tmp_path):
    args = text_args("--text_conditioning", "tokens")
    model = perturb(with_captions(Denoiser(args)))
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), 0, args)
    ckpt = read_checkpoint(path)
    assert ckpt["args"].text_conditioning == "tokens" and ckpt["text_encoder"].endswith("|last-hidden-tokens-v1")
    reloaded = Denoiser(text_args("--text_conditioning", "tokens"))
    load_checkpoint(reloaded, path, read_checkpoint(path))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match=r"trained with the caption LLM .*last-hidden-tokens-v1.* but this model "
                                         r"uses .*masked-mean-v1"):
        load_checkpoint(Denoiser(text_args()), path, read_checkpoint(path))


def test_training_and_sampling_read_the_same_rows(text_args, tmp_path):
    """Training (util/datasets.setup_captions) and sampling (sample.py's store lookup of its prompts, in another batch
    and another process's model) read a caption's features bit for bit alike, in both modes."""
    from util.datasets import setup_captions
    for mode in ("pooled", "tokens"):
        args = text_args("--text_conditioning", mode, "--text_cache_dir", str(tmp_path / "stores"))
        trained = Denoiser(args)
        dataset = type("Data", (), {"captions": CAPTIONS, "samples": [("0.png", 0)]})()  # as build_dataset's
        setup_captions(args, trained, dataset)
        sampler = Denoiser(args)
        prompts = ["a new prompt", CAPTIONS[3], CAPTIONS[1]]
        sampler.net.y_embedder.use_captions(prompts, args.text_cache_dir, show_progress=False)  # as sample.py
        train_rows, train_mask = trained.net.y_embedder.caption_features(torch.tensor([3, 0, 1]))
        sample_rows, sample_mask = sampler.net.y_embedder.caption_features(torch.tensor([1, 2]))
        n3, n1 = train_mask[0].sum(), train_mask[2].sum()
        assert torch.equal(sample_rows[0, :n3], train_rows[0, :n3]) and torch.equal(sample_rows[1, :n1], train_rows[2, :n1])


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_a_batch_of_caption_features_reaches_the_device_in_one_copy(text_args, monkeypatch, mode):
    """The rows read from the store for a batch go to the embedder's device as one tensor, not one per caption (the
    meta device stands in for a GPU: a copy to it is a .to() from the CPU); the values are the stored rows."""
    model = with_captions(Denoiser(text_args("--text_conditioning", mode)))
    embedder = model.net.y_embedder
    ids = torch.tensor([0, -1, 2, 3])
    features, mask = embedder.caption_features(ids)  # on the CPU, where nothing is copied
    rows = embedder.store.read(embedder._locations[[0, 2, 3]])
    lengths = [len(rows[0]), 1, len(rows[1]), len(rows[2])]
    assert mask.sum(1).tolist() == lengths and features.shape == (4, max(lengths), 32) and mask.dtype == torch.bool
    for i, row in zip((0, 2, 3), rows):
        assert torch.equal(features[i, :len(row)], row.float()) and not features[i, len(row):].any()
    assert not features[1].any()
    copies = []  # (from, to) of every .to() that changes a tensor's device
    to = torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        moved = to(tensor, *args, **kwargs)
        if moved.device != tensor.device:
            copies.append((tensor.device.type, moved.device.type))
        return moved

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    embedder.to("meta")
    copies.clear()
    features, mask = embedder.caption_features(ids)
    assert copies == [("cpu", "meta")]
    assert features.device.type == mask.device.type == "meta"
    assert features.shape == (4, max(lengths), 32) and features.dtype == torch.float32
    assert mask.shape == (4, max(lengths))


def test_main_trains_a_tokens_model_and_sample_py_rebuilds_it(caption_folder, tiny_llm_path, tmp_path, llm_loads):
    import sample
    out = tmp_path / "out"
    env = dict(os.environ, JIT_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "main_jit.py", "--model", "JiT-T/4-Text", "--img_size", "32",
                             "--device", "cpu", "--llm_model_name", tiny_llm_path, "--data_path", str(caption_folder),
                             "--output_dir", str(out), "--num_workers", "0", "--batch_size", "4",
                             "--text_conditioning", "tokens", "--epochs", "1", "--warmup_epochs", "1",
                             "--log_freq", "1"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "Epoch [0] [2/2] loss" in result.stdout + result.stderr
    assert [name.split("-")[1] for name in os.listdir(tmp_path / "cache" / "text_features")] == ["tokens"]
    ckpt = read_checkpoint(out / "checkpoint-last.pth")
    assert "net.y_embedder.token_proj.weight" in ckpt["model"] and ckpt["args"].text_conditioning == "tokens"
    grid = tmp_path / "grid.png"
    argv = ["--checkpoint", str(out), "--prompts", CAPTIONS[0], "a red circle", "--per_class", "1",
            "--num_sampling_steps", "2", "--cfg", "2.0", "--device", "cpu", "--precision", "fp32",
            "--text_cache_dir", str(tmp_path / "cache" / "text_features"), "--out", str(grid)]
    sample.main(argv)
    assert Image.open(grid).size == (34 + 2, 2 * 34 + 2)
    # the LLM was loaded for the one prompt training had not stored, then released
    assert len(llm_loads.loads) == 1 and len(llm_loads.calls) == 1 and llm_loads.models[0]() is None
    sample.main(argv)  # both prompts stored now: no LLM weights loaded at all
    assert len(llm_loads.loads) == 1
