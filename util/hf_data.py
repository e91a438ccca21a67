"""Training data from a Hugging Face data set, read with the `datasets` library: a Hub name written `hf:cifar10` (from
the library's cache, downloaded once; offline with HF_HUB_OFFLINE=1), a folder written by `save_to_disk`, or a folder
of parquet files.

HFImages indexes one split like the folder data sets: `.samples` are (Row, label) pairs and a Row decodes its stored
bytes with util/data.load_rgb, so ImageSamples, the ADM crop, the sampler (exact resume, DDP shards), --check_data,
--val_fraction and --on_bad_data work on rows as on files. Columns not named by a flag are detected from the
features: the image column is the one `Image` feature; the class label the one `ClassLabel` column, else the one
integer column; the caption the one string column. None or several candidates stop with one line listing them and
the flag to pass.
"""
import dataclasses
import glob
import io
import os
import warnings

from util.data import index_captions, load_rgb

HF_PREFIX = "hf:"
INTEGER_DTYPES = {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}
STRING_DTYPES = {"string", "large_string"}


def is_saved_dataset(path):
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def is_hf_source(path):
    """hf:<Hub name>, a save_to_disk folder, or a folder with parquet files in it or one level down (the Hub's
    data/ layout); deeper folders are not searched, so an ImageNet tree costs one directory listing."""
    return path.startswith(HF_PREFIX) or os.path.isdir(path) and (
        is_saved_dataset(path) or bool(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
        or bool(glob.glob(os.path.join(glob.escape(path), "*", "*.parquet"))))


def load_split(source, split):
    """The `datasets.Dataset` of one split; one line starting with --data_path on failure."""
    import datasets  # imported only when a Hugging Face data set is used: it costs every start CPU time
    where = f"--data_path {source}"
    try:
        if source.startswith(HF_PREFIX):
            return datasets.load_dataset(source[len(HF_PREFIX):], split=split)
        if not is_saved_dataset(source):
            return datasets.load_dataset(source, split=split)  # parquet files, split by file name (else all "train")
        saved = datasets.load_from_disk(source)
    except ConnectionError as e:  # offline without the data set in the cache
        raise ValueError(f"{where}: not in the Hugging Face cache and the Hub is unreachable ({first_line(e)}); "
                         f"download it once with network access (without HF_HUB_OFFLINE=1)") from None
    except Exception as e:  # noqa: BLE001 - unknown names, splits, unreadable files: the library's own words
        raise ValueError(f"{where}: cannot load split {split!r} (--hf_split) "
                         f"({type(e).__name__}: {first_line(e)})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{where}: no split {split!r} (splits: {', '.join(saved)}); pass --hf_split")
        return saved[split]
    return saved  # a single saved Dataset has no splits: --hf_split does not apply


def first_line(error):
    return (str(error).strip().splitlines() or [""])[0]


def is_integer(feature):
    return getattr(feature, "dtype", None) in INTEGER_DTYPES


def is_string(feature):
    return getattr(feature, "dtype", None) in STRING_DTYPES


def label_problem(value, class_num):
    if value is None or not 0 <= value < class_num:
        return f"label {value} outside --class_num {class_num} (0..{class_num - 1})"
    return None


def caption_problem(caption):
    return None if caption else "empty caption"


def pick_column(features, where, flag, given, what, *rules, cast=False):
    """The column named by `flag` (matching a rule, unless the caller casts it), else the only column matching the
    first rule that matches any (in order)."""
    columns = ", ".join(features)
    if given is not None:
        if given not in features:
            raise ValueError(f"{where}: no column {given!r} ({flag}); columns: {columns}")
        if not cast and not any(rule(features[given]) for rule in rules):
            raise ValueError(f"{where}: column {given!r} ({flag}) holds {features[given]}, not a {what}")
        return given
    for rule in rules:
        candidates = [name for name, feature in features.items() if rule(feature)]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise ValueError(f"{where}: {len(candidates)} {what} columns ({', '.join(candidates)}); "
                             f"pass {flag} with one of them")
    raise ValueError(f"{where}: no {what} column among {columns}; pass {flag}")


class ImageColumn:
    """The image column of a split, read as stored ({"bytes", "path"} per row) from the Arrow column itself, without
    the library's per-row formatting (README, Hugging Face); row i is entry i: splits come without an indices map."""

    def __init__(self, dataset, column, where):
        import datasets
        try:
            self.rows = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        except Exception as e:  # noqa: BLE001 - a column the library cannot read as images
            raise ValueError(f"{where}: column {column!r} ({dataset.features[column]}) does not hold images "
                             f"({type(e).__name__}: {first_line(e)}); pass --hf_image_column") from None
        self.column, self.where = column, where
        self.storage = None  # the Arrow column, taken in each process (a pickled one would be copied)

    def __getstate__(self):
        return dict(self.__dict__, storage=None)

    def load(self, index):
        if self.storage is None:
            self.storage = self.rows.data.column(self.column)
        stored = self.storage[index].as_py()
        if stored is None:
            raise ValueError("no image in this row")
        if stored["bytes"] is None:  # data sets built from local files may store only the path
            return load_rgb(stored["path"])
        return load_rgb(io.BytesIO(stored["bytes"]))


@dataclasses.dataclass(frozen=True, repr=False)
class Row:
    """A sample's "path": messages name the row (str), util/data.load_sample decodes it (load)."""
    images: ImageColumn
    index: int

    def load(self):
        return self.images.load(self.index)

    def __str__(self):
        return f"{self.images.where} row {self.index}, column {self.images.column}"

    def __repr__(self):
        return f"Row({self})"


class HFImages:
    """One split as training samples: `.samples` [(Row, label)], label the class (labels="class", checked against
    class_num), the caption id into `.captions` (labels="caption", distinct captions in order of first appearance, as
    TextImageDataset), or None (labels=None: images only, prepare_ref.py). A label outside [0, class_num) or an empty
    caption stops with one line naming the row (on_bad="error"), or the row is left out with a warning ("skip")."""

    def __init__(self, source, split="train", image_column=None, labels=None, label_column=None,
                 caption_column=None, class_num=None, on_bad="error"):
        import datasets
        dataset = load_split(source, split)
        where = f"--data_path {source} split {split}"
        features = dataset.features
        # a named image column need not be an Image feature (e.g. {bytes, path} structs of parquet written by other
        # tools): ImageColumn casts it
        self.images = ImageColumn(dataset, pick_column(features, where, "--hf_image_column", image_column, "image",
                                                       lambda f: isinstance(f, datasets.Image), cast=True), where)
        if labels is None:
            self.samples = [(Row(self.images, i), None) for i in range(len(dataset))]
            return
        if labels == "class":
            column = pick_column(features, where, "--hf_label_column", label_column, "class label",
                                 lambda f: isinstance(f, datasets.ClassLabel), is_integer)
            values = read_column(dataset, column)
            problems = [label_problem(v, class_num) for v in values]
        else:
            column = pick_column(features, where, "--hf_caption_column", caption_column, "caption", is_string)
            values = [v.strip() if isinstance(v, str) else v for v in read_column(dataset, column)]
            problems = [caption_problem(v) for v in values]
        bad = [(i, reason) for i, reason in enumerate(problems) if reason]
        if bad:
            first = f"{where} row {bad[0][0]}, column {column}: {bad[0][1]}"
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            if on_bad == "error":
                raise ValueError(f"{first}{more}; fix the data or pass --on_bad_data skip")
            warnings.warn(f"{first}{more}; skipping {len(bad)} row(s)")
        skipped = {i for i, _ in bad}
        kept = [i for i in range(len(values)) if i not in skipped]
        if not kept:
            raise ValueError(f"{where}: no usable rows")
        if labels == "class":
            self.samples = [(Row(self.images, i), values[i]) for i in kept]
            return
        self.captions, self.samples = index_captions([(Row(self.images, i), values[i]) for i in kept])


def read_column(dataset, column):
    """Every value of a column as Python objects, read from Arrow in one go (not row by row)."""
    return dataset.select_columns([column]).with_format("arrow")[column].to_pylist()
