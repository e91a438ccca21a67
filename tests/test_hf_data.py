"""Hugging Face data sets as a training source (util/hf_data.py): parquet files and save_to_disk folders give the
batches of the same images as an ImageFolder / images+captions folder, train and resume exactly, hold out and shard
like them; columns are detected from the features; bad input stops with one line naming the row or the flag.
Offline: HF_HUB_OFFLINE=1 and a temporary HF_DATASETS_CACHE (conftest.py)."""
import io
import os
import signal
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import prepare_ref
from util.args import get_args_parser
from util.datasets import build_dataset, build_train_loader, build_val_set
from util import fid
from util.data import ImageSamples, check_data, train_transform
from util.hf_data import HFImages
from util.preemption import PREEMPTED_EXIT_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "JiT-T/4", "--img_size", "32", "--class_num", "3", "--device", "cpu"]
CLASSES = ["a", "b", "c"]
CAPTIONS = ["犬の写真", "a photo of a cat", "赤いりんごの写真", "the blue sky with white clouds", "金魚が水槽で泳いでいる"]


def encoded_image(rng, i, rgba):
    """(bytes, extension) of a random image: PNG (RGB, grayscale, and RGBA when rgba: composited over white by the
    decoder) or JPEG, sides from 20 to 85 px (the crop upscales, resizes, and halves)."""
    h, w = int(rng.integers(20, 86)), int(rng.integers(20, 86))
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
    out = io.BytesIO()
    if i % 4 == 0:
        image.save(out, format="JPEG", quality=90)
        return out.getvalue(), "jpg"
    if i % 4 == 1:
        image = image.convert("L")
    elif i % 4 == 2 and rgba:
        image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8)))
    image.save(out, format="PNG")
    return out.getvalue(), "png"


def write_split(root, name, count, seed, rgba):
    """`count` rows in ImageFolder order (class by class, then file name), also written as <root>/<name>/train/<class>/
    and as <root>/<name>_text/images + captions/ with the same bytes. Returns the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        data, ext = encoded_image(rng, i, rgba)
        label = i * len(CLASSES) // count
        caption = CAPTIONS[(2 * i + 2) % 5]  # first appearances out of list order
        rows.append({"image": {"bytes": data, "path": None}, "label": label, "caption": caption})
        for path in (root / name / "train" / CLASSES[label] / f"{i:03d}.{ext}", root / f"{name}_text" / "images" /
                     f"{i:03d}.{ext}"):
            os.makedirs(path.parent, exist_ok=True)
            path.write_bytes(data)
        os.makedirs(root / f"{name}_text" / "captions", exist_ok=True)
        (root / f"{name}_text" / "captions" / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return rows


FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                              "caption": datasets.Value("string")})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 240-row train split (with transparent PNGs) and a 16-row test split (the training runs), each as two
    parquet files per split, as a save_to_disk DatasetDict, and as folders."""
    root = tmp_path_factory.mktemp("hf")
    splits = {"train": write_split(root, "folder", 240, 0, rgba=True),
              "test": write_split(root, "folder_test", 16, 1, rgba=False)}
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=FEATURES)
                                    for name, rows in splits.items()})
    dataset.save_to_disk(str(root / "disk"))
    os.makedirs(root / "parquet")
    for name, split in dataset.items():
        for shard in range(2):
            file = root / "parquet" / f"{name}-{shard:05d}-of-00002.parquet"
            split.shard(2, shard, contiguous=True).to_parquet(str(file))
    return root


def loader_args(data_path, *extra, rank=0, world_size=1):
    args = get_args_parser().parse_args(TINY + ["--data_path", str(data_path), "--batch_size", "16", *map(str, extra)])
    args.rank, args.world_size = rank, world_size
    return args


def batches(args, text, epoch, start_step=0):
    loader = build_train_loader(args, build_dataset(args, text))
    loader.sampler.set_epoch(epoch, start_index=start_step * args.batch_size)
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("source", ["parquet", "disk"])
def test_batches_equal_folder_batches(data, source):
    """Same sampler, same crops, same labels or caption ids: single process and the second of two DDP ranks, whole
    epochs and an epoch resumed mid-way, with and without loader workers."""
    for text, folder in ((False, data / "folder"), (True, data / "folder_text")):
        hf = build_dataset(loader_args(data / source), text)
        assert len(hf.samples) == 240
        if text:
            assert hf.captions == build_dataset(loader_args(folder), text).captions and len(hf.captions) == 5
        for rank, world_size, epoch, start_step, workers in [(0, 1, 0, 0, 0), (1, 2, 3, 2, 0), (0, 1, 1, 5, 2)]:
            extra = ["--num_workers", str(workers)]
            expected = batches(loader_args(folder, *extra, rank=rank, world_size=world_size), text, epoch, start_step)
            got = batches(loader_args(data / source, *extra, rank=rank, world_size=world_size), text, epoch, start_step)
            assert len(got) == len(expected) == 240 // world_size // 16 - start_step
            for (x1, y1), (x2, y2) in zip(expected, got):
                assert x2.dtype == torch.uint8 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_splits_and_validation(data):
    test_split = build_dataset(loader_args(data / "disk", "--hf_split", "test"), False)
    assert [label for _, label in test_split.samples] == [i * 3 // 16 for i in range(16)]

    held_out = {}
    for source in ("parquet", "disk"):
        args = loader_args(data / source, "--val_fraction", "0.1")
        dataset = build_dataset(args, False)
        val_samples, val_captions = build_val_set(args, dataset, False)
        assert len(val_samples) == 24 and len(dataset.samples) == 216 and val_captions == []
        rows = [row.index for row, _ in val_samples]
        assert not set(rows) & {row.index for row, _ in dataset.samples}
        held_out[source] = rows
    assert held_out["parquet"] == held_out["disk"]  # keyed by the row index: the same rows on every rank and resume

    args = loader_args(data / "parquet", "--val_path", data / "disk")  # --hf_val_split test
    val_samples, _ = build_val_set(args, build_dataset(args, False), False)
    assert len(val_samples) == 16 and str(val_samples[0][0]).startswith(f"--data_path {data / 'disk'} split test")
    args = loader_args(data / "parquet", "--val_path", data / "disk", "--hf_val_split", "validation")
    with pytest.raises(SystemExit, match=r"^--val_path .*: no split 'validation' \(splits: train, test\); "
                                         r"pass --hf_split$"):
        build_val_set(args, build_dataset(args, False), False)


def saved(tmp_path, name, rows, features):
    path = tmp_path / name
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).save_to_disk(str(path))
    return path


def png(value):
    out = io.BytesIO()
    Image.new("RGB", (40, 40), (value, 0, 0)).save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}


def one_line_error(args, text=False):
    with pytest.raises(SystemExit) as e:
        build_dataset(args, text)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_column_detection(tmp_path):
    """The one Image feature; the one ClassLabel column, else the one integer column; the one string column."""
    path = saved(tmp_path, "ints", [{"img": png(i), "y": i % 2, "id": f"x{i}", "score": 0.5} for i in range(4)],
                 {"img": datasets.Image(), "y": datasets.Value("int32"), "id": datasets.Value("string"),
                  "score": datasets.Value("float32")})
    dataset = build_dataset(loader_args(path), False)
    assert [label for _, label in dataset.samples] == [0, 1, 0, 1]
    assert str(dataset.samples[2][0]) == f"--data_path {path} split train row 2, column img"
    assert build_dataset(loader_args(path), True).captions == ["x0", "x1", "x2", "x3"]
    image = ImageSamples(dataset.samples, train_transform(32))[3][0]
    assert image.shape == (3, 32, 32) and image[0].float().mean() == 3  # row 3's red 3

    two = saved(tmp_path, "two", [{"img": png(i), "fine": i, "coarse": 0, "en": "x", "ja": "y"} for i in range(3)],
                {"img": datasets.Image(), "fine": datasets.ClassLabel(num_classes=3),
                 "coarse": datasets.ClassLabel(num_classes=1), "en": datasets.Value("string"),
                 "ja": datasets.Value("large_string")})
    assert one_line_error(loader_args(two)) == (f"--data_path {two} split train: 2 class label columns (fine, coarse); "
                                                f"pass --hf_label_column with one of them")
    assert [label for _, label in build_dataset(loader_args(two, "--hf_label_column", "fine"), False).samples] == \
        [0, 1, 2]
    assert one_line_error(loader_args(two), text=True) == (
        f"--data_path {two} split train: 2 caption columns (en, ja); pass --hf_caption_column with one of them")
    assert build_dataset(loader_args(two, "--hf_caption_column", "ja"), True).captions == ["y"]
    assert one_line_error(loader_args(two, "--hf_label_column", "Fine")) == (
        f"--data_path {two} split train: no column 'Fine' (--hf_label_column); columns: img, fine, coarse, en, ja")
    assert one_line_error(loader_args(two, "--hf_caption_column", "en")) == (
        "--hf_caption_column en: class models use --hf_label_column")
    assert one_line_error(loader_args(two, "--hf_label_column", "en")) == (
        f"--data_path {two} split train: column 'en' (--hf_label_column) holds Value('string'), not a class label")
    assert one_line_error(loader_args(two, "--hf_caption_column", "fine"), text=True) == (
        f"--data_path {two} split train: column 'fine' (--hf_caption_column) holds ClassLabel(names=['0', '1', '2']), "
        f"not a caption")

    plain = tmp_path / "plain"  # parquet written by another tool: no Hugging Face features, images as structs
    os.makedirs(plain)
    pq.write_table(pa.table({"picture": [png(i) for i in range(3)], "label": [2, 0, 1]}), plain / "part.parquet")
    assert one_line_error(loader_args(plain)) == (
        f"--data_path {plain} split train: no image column among picture, label; pass --hf_image_column")
    samples = build_dataset(loader_args(plain, "--hf_image_column", "picture"), False).samples
    assert [(int(ImageSamples(samples, train_transform(32))[i][0][0].float().mean()), label)
            for i, (_, label) in enumerate(samples)] == [(0, 2), (1, 0), (2, 1)]

    no_image = saved(tmp_path, "no_image", [{"pixels": [1, 2], "label": 0}],
                     {"pixels": datasets.Sequence(datasets.Value("int64")), "label": datasets.Value("int64")})
    assert one_line_error(loader_args(no_image)) == (
        f"--data_path {no_image} split train: no image column among pixels, label; pass --hf_image_column")
    assert one_line_error(loader_args(no_image, "--hf_image_column", "label")).startswith(
        f"--data_path {no_image} split train: column 'label' (Value('int64')) does not hold images (")
    assert one_line_error(loader_args(no_image), text=True) == (
        f"--data_path {no_image} split train: no image column among pixels, label; pass --hf_image_column")


def test_bad_rows_stop_naming_the_row_or_are_skipped(data, tmp_path):
    assert one_line_error(loader_args(data / "parquet", "--class_num", "2")) == (
        f"--data_path {data / 'parquet'} split train row 160, column label: label 2 outside --class_num 2 (0..1) "
        f"(and 79 more rows); fix the data or pass --on_bad_data skip")
    with pytest.warns(UserWarning, match=r"row 160, column label: label 2 outside .* skipping 80 row\(s\)$"):
        dataset = build_dataset(loader_args(data / "parquet", "--class_num", "2", "--on_bad_data", "skip"), False)
    assert len(dataset.samples) == 160 and {label for _, label in dataset.samples} == {0, 1}

    path = saved(tmp_path, "bad", [{"image": png(0), "label": 0, "caption": "one"},
                                   {"image": {"bytes": b"not an image", "path": None}, "label": 1, "caption": " "},
                                   {"image": png(2), "label": 2, "caption": "three"}],
                 {"image": datasets.Image(), "label": datasets.Value("int64"), "caption": datasets.Value("string")})
    assert one_line_error(loader_args(path), text=True) == (
        f"--data_path {path} split train row 1, column caption: empty caption; fix the data or pass "
        f"--on_bad_data skip")
    samples = build_dataset(loader_args(path), False).samples
    with pytest.raises(RuntimeError) as e:
        ImageSamples(samples, train_transform(32))[1]
    assert e.value.line.startswith(f"--data_path {path} split train row 1, column image: unreadable image "
                                   f"(UnidentifiedImageError: ") and "\n" not in e.value.line
    assert e.value.line.endswith("; fix or remove it, or pass --on_bad_data skip")
    with pytest.warns(UserWarning, match="row 1, column image: unreadable image"):
        image, label = ImageSamples(samples, train_transform(32), on_bad="skip")[1]
    assert label == 2 and image[0, 0, 0].item() == 2  # the next row, with its own label
    with pytest.raises(SystemExit, match=r"(?s)1 unreadable file.*split train row 1, column image: Unidentified"):
        check_data(samples, "error", num_workers=0, show_progress=False)
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        assert check_data(samples, "skip", num_workers=0, show_progress=False) == [samples[0], samples[2]]


def test_sources_that_cannot_be_read(data, tmp_path):
    assert one_line_error(loader_args("hf:jit-test/not-in-the-cache")) == (
        "--data_path hf:jit-test/not-in-the-cache: not in the Hugging Face cache and the Hub is unreachable "
        "(Couldn't reach 'jit-test/not-in-the-cache' on the Hub (OfflineModeIsEnabled)); download it once with "
        "network access (without HF_HUB_OFFLINE=1)")
    assert one_line_error(loader_args(data / "parquet", "--hf_split", "val")).startswith(
        f"--data_path {data / 'parquet'}: cannot load split 'val' (--hf_split) (ValueError: Unknown split \"val\"")
    assert one_line_error(loader_args(data / "folder", "--hf_image_column", "image")) == (
        f"--hf_image_column image: --data_path {data / 'folder'} is not a Hugging Face data set (hf:<Hub name>, a "
        f"save_to_disk folder or a folder of parquet files)")


def train(data_path, out, *extra, model="JiT-T/4"):
    cmd = [sys.executable, "main_jit.py", *TINY, "--model", model, "--precision", "fp32", "--data_path",
           str(data_path), "--output_dir", str(out), "--resume", str(out), "--batch_size", "4", "--num_workers", "0",
           "--epochs", "1", "--warmup_epochs", "1", "--blr", "1e-2", "--log_freq", "1", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def finished(proc):
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    return log


def losses(log):
    return [line.split("] loss ")[1].split()[0] for line in log.splitlines() if "] loss " in line]


def weights(out):
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_training_from_parquet_and_save_to_disk_resumes_exactly(data, tmp_path):
    """Four steps (16 test rows, batch 4) from parquet, and from save_to_disk preempted mid-epoch and resumed: the
    same losses and the same final weights (the batches equal the folder's: test_batches_equal_folder_batches)."""
    parquet = finished(train(data / "parquet", tmp_path / "parquet", "--hf_split", "test"))
    assert "16 training images" in parquet and len(losses(parquet)) == 4

    proc = train(data / "disk", tmp_path / "disk", "--hf_split", "test")
    log = ""
    for line in proc.stdout:
        log += line
        if "Epoch [0] [1/4]" in line:
            proc.send_signal(signal.SIGUSR1)  # preempted, as SLURM does, mid-epoch
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE, log
    resumed = finished(train(data / "disk", tmp_path / "disk", "--hf_split", "test"))
    assert "continuing at epoch 0 step" in resumed and losses(log) + losses(resumed) == losses(parquet)
    final, expected = weights(tmp_path / "disk"), weights(tmp_path / "parquet")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_text_model_trains_from_captions_column(data, tiny_llm_path, tmp_path):
    log = finished(train(data / "disk", tmp_path / "text", "--hf_split", "test", "--llm_model_name", tiny_llm_path,
                         model="JiT-T/4-Text"))
    assert "5 distinct captions, 16 evaluation prompts (captions of random training images" in log and len(losses(log)) == 4


@pytest.mark.slow
def test_reference_statistics_equal_folder_statistics(data, tmp_path):
    weights_file = fid.convert_fid_helper_weights(str(tmp_path / "cache"))
    stats = {}
    for name, extra in (("folder", ["--data_path", data / "folder_test"]),
                        ("parquet", ["--data_path", data / "parquet", "--hf_split", "test"])):
        out = tmp_path / f"{name}.npz"
        prepare_ref.main(prepare_ref.get_args_parser().parse_args(list(map(str, extra)) + [
            "--img_size", "32", "--stats_out", str(out), "--num_workers", "0", "--inception_weights", weights_file,
            "--device", "cpu", "--max_images", "12"]))
        stats[name] = fid.load_stats(str(out))
    np.testing.assert_allclose(stats["parquet"]["mu"], stats["folder"]["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["parquet"]["sigma"], stats["folder"]["sigma"], rtol=1e-4, atol=1e-6)
