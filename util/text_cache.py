"""On-disk cache of pooled caption features of a frozen LLMTextEncoder (model_jit.py).

A caption's embedding never changes while the LLM is frozen, so each distinct caption goes through the LLM once,
ever: the features are stored in `<cache_dir>/text_features_<key>.pt`, one file per (encoder fingerprint, LLM
compute dtype), and reused across runs. Typical use: `table = embed_captions(encoder, dataset.captions, cache_dir)`
gives the (num_captions, llm_hidden) float32 table whose row caption_id the model looks up like a class label.

Exactness: a cached row is bit for bit the row encoder.pooled_features returned when it was computed (torch.save
keeps the bits). Whether that equals an on-the-fly pooled_features call depends on the batch: the same captions
batched the same way give identical bits (e.g. batch_size=1 against one caption at a time), but a caption batched
with other captions (different padded length / batch size) differs by float rounding of the LLM's kernels
(measured up to ~3e-7 absolute in float32 on the CPU; larger in bfloat16 on CUDA). So that training and sampling
see exactly the same vector for a caption, look prompts up through embed_captions too (it fills the cache for
new ones) instead of calling pooled_features directly.
"""
import hashlib
import os
import tempfile
import time

import torch
from tqdm import tqdm

CACHE_VERSION = 1


def cache_path(encoder, cache_dir):
    """File holding the features of `encoder` (its fingerprint and LLM compute dtype) under cache_dir."""
    key = f"{encoder.fingerprint()}|{encoder.llm_compute_dtype}|v{CACHE_VERSION}"
    return os.path.join(cache_dir, f"text_features_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")


def _load(path, encoder):
    """{caption: feature row} from the cache file, or {} if there is none."""
    if not os.path.isfile(path):
        return {}
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("fingerprint") != encoder.fingerprint() or data.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: cache file of another encoder ({data.get('fingerprint')!r}); remove it")
    return dict(zip(data["captions"], data["features"]))


def _save(path, encoder, table):
    """Write the cache atomically (temporary file + os.replace), merged with what another process may have added."""
    merged = _load(path, encoder)
    merged.update(table)
    captions = list(merged)
    features = (torch.stack([merged[c] for c in captions]) if captions
                else torch.empty(0, encoder.llm_hidden_size, dtype=torch.float32))
    data = {"version": CACHE_VERSION, "fingerprint": encoder.fingerprint(),
            "compute_dtype": str(encoder.llm_compute_dtype), "captions": captions, "features": features}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_text_features_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    table.update(merged)


def embed_captions(encoder, captions, cache_dir, batch_size=64, save_every_s=600.0, progress=True):
    """(len(captions), llm_hidden) float32 CPU tensor of encoder.pooled_features for each caption (in order).

    Only captions missing from the cache go through the LLM, each distinct one once, in batches of batch_size
    (in order of first appearance); the cache file is rewritten at the end and every save_every_s seconds of
    compute (so an interrupted run keeps most of its work). cache_dir=None: no disk, in-memory only.
    With several processes (DDP), call it on one rank first and barrier, then on the others.
    """
    if not getattr(encoder, "freeze", True):
        raise ValueError("embed_captions caches features of a frozen LLM only: a trainable LLM's would go stale")
    captions = list(captions)
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = cache_path(encoder, cache_dir) if cache_dir is not None else None
    table = _load(path, encoder) if path is not None else {}
    missing = list(dict.fromkeys(c for c in captions if c not in table))
    if missing:
        last_save = time.monotonic()
        with tqdm(total=len(missing), desc="embedding captions", unit="caption", disable=not progress) as bar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                features = encoder.pooled_features(chunk).float().cpu()
                table.update(zip(chunk, features))
                bar.update(len(chunk))
                if path is not None and time.monotonic() - last_save > save_every_s:
                    _save(path, encoder, table)
                    last_save = time.monotonic()
        if path is not None:
            _save(path, encoder, table)
    if not captions:
        return torch.empty(0, encoder.llm_hidden_size, dtype=torch.float32)
    return torch.stack([table[c] for c in captions]).contiguous()
