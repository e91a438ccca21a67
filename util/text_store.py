"""Caption feature store: the frozen LLM's features of every distinct caption, on disk, read per batch.

A caption's features never change while the LLM is frozen, so each distinct caption goes through the LLM once, ever.
A store is one folder per (CaptionLLM fingerprint: LLM, tokenizer, max_text_len, features kept; LLM compute dtype):

    store.json                      what the store holds (fingerprint, compute dtype, width); checked on open
    shard-<writer>-<n>.safetensors  `features` (rows, width) float16 and `offsets` (captions + 1,) int64: caption k
                                    of the shard is features[offsets[k]:offsets[k + 1]]; its captions (JSON list) in
                                    the safetensors metadata. One row per caption (pooled) or per real token (tokens)
    index.json                      caption -> (shard, row): the shards and their captions in order

Bytes per caption: 2 x width (+ 8 for its offset) pooled; 2 x width x (its real tokens) (+ 8) per token.
Nothing holds the whole table: the shards are memory-mapped by safetensors and a batch reads only its rows; a process
keeps the caption -> location map and, while building, at most one shard (shard_bytes) of new rows.

Building (build_store) is split across ranks: each embeds its share of the captions missing from the store into its
own shards; rank 0 then merges the index. Only a rank with captions to embed loads the LLM's weights, and only for
as long as it embeds them (CaptionLLM.loaded): opening and checking a store needs the tokenizer and config alone.
A shard is written atomically (temporary file + rename) once full, so a killed build keeps its completed shards and
a rerun embeds only what is still missing.

Exactness: a row read from the store is bit for bit the row written, whoever reads it, so training and sampling see
the same features for a caption as long as both go through the store (sample.py and evaluation prompts do). The LLM
features themselves depend on the batch a caption was embedded in, by float rounding of the LLM's kernels (README,
Caption feature store): computing them again on the fly would differ.
"""
import hashlib
import json
import os
import socket
import uuid

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import util.misc as misc

STORE_VERSION = 1
SHARD_BYTES = 256 * 2 ** 20  # new rows kept in memory before a shard is written (and lost at most by a kill)
FLOAT16_MAX = torch.finfo(torch.float16).max


def default_root():
    """Folder holding the stores (one subfolder each): $JIT_CACHE_DIR/text_features or ~/.cache/jit/text_features."""
    return os.path.join(misc.cache_dir(), "text_features")


def store_key(llm, device):
    """What a store is of: the CaptionLLM's fingerprint and the dtype its features are computed in on `device`."""
    return f"{llm.fingerprint()}|{llm.compute_dtype(device)}|store-v{STORE_VERSION}"


def store_folder(llm, root, device="cpu"):
    """The store of `llm` (a CaptionLLM embedding on `device`) under root:
    <LLM folder name>-<conditioning>-len<max_text_len>-<hash of the key>."""
    name = os.path.basename(llm.name_or_path.rstrip("/\\")) or "llm"
    digest = hashlib.sha256(store_key(llm, device).encode()).hexdigest()[:12]
    return os.path.join(root, f"{name}-{llm.conditioning}-len{llm.max_text_len}-{digest}")


class CaptionStore:
    """One store folder (see the module docstring). Opening it checks that it holds the features of `llm` (a
    CaptionLLM) computed on `device`."""

    def __init__(self, folder, llm, device="cpu"):
        self.folder = str(folder)
        self.width = llm.hidden_size
        self.meta = {"version": STORE_VERSION, "fingerprint": llm.fingerprint(),
                     "compute_dtype": str(llm.compute_dtype(device)), "width": self.width}
        meta_path = os.path.join(self.folder, "store.json")
        os.makedirs(self.folder, exist_ok=True)
        if not os.path.isfile(meta_path):
            misc.write_json(meta_path, self.meta)
        with open(meta_path, encoding="utf-8") as f:
            theirs = json.load(f)
        if theirs != self.meta:
            raise ValueError(f"{self.folder}: caption store of another LLM ({theirs.get('fingerprint')}, "
                             f"{theirs.get('compute_dtype')}), not of {self.meta['fingerprint']} "
                             f"({self.meta['compute_dtype']}); remove it or use another --text_cache_dir")
        self._shards = []  # shard file names; a location is (shard index, caption index in the shard)
        self._shard_captions_list = []  # the captions of each shard, in order
        self.unindexed = 0  # shards not yet in index.json
        self._where = {}  # caption -> shard index << 32 | caption index in the shard (an int: ~100 B per caption)
        self._open = {}  # shard index -> (features slice, offsets), opened on first read
        self._writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._written = 0
        self.refresh()

    # ------------------------------------------------------------------ index
    def _add_shard(self, name, captions):
        shard = len(self._shards)
        self._shards.append(name)
        self._shard_captions_list.append(captions)
        for k, caption in enumerate(captions):
            self._where.setdefault(caption, shard << 32 | k)  # in two shards (two concurrent builds): the first

    def refresh(self):
        """Read index.json, then the shards written since (completed by a build that was killed, or by other ranks)."""
        self._shards, self._shard_captions_list, self._where, self._open = [], [], {}, {}
        index_path = os.path.join(self.folder, "index.json")
        indexed = set()
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            for entry in index["shards"]:
                if os.path.isfile(os.path.join(self.folder, entry["file"])):
                    self._add_shard(entry["file"], entry["captions"])
                    indexed.add(entry["file"])
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("shard-") and name.endswith(".safetensors") and name not in indexed:
                self._add_shard(name, self._shard_captions(name))
        self.unindexed = len(self._shards) - len(indexed)

    def _shard_captions(self, name):
        path = os.path.join(self.folder, name)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("fingerprint") != self.meta["fingerprint"]:
            raise ValueError(f"{path}: shard of another LLM ({metadata.get('fingerprint')}); remove it")
        return json.loads(metadata["captions"])

    def write_index(self):
        """index.json of every shard now in the folder (rank 0, after the others wrote their shards)."""
        self.refresh()
        shards = [{"file": name, "captions": captions} for name, captions in zip(self._shards, self._shard_captions_list)]
        misc.write_json(os.path.join(self.folder, "index.json"), {**self.meta, "shards": shards})

    def __len__(self):
        return len(self._where)

    def missing(self, captions):
        """The distinct captions not in the store, in order of first appearance."""
        return [c for c in dict.fromkeys(captions) if c not in self._where]

    def locate(self, captions):
        """(len(captions), 2) int64 array of (shard, caption index in the shard); every caption must be stored."""
        absent = self.missing(captions)
        if absent:
            raise KeyError(f"{self.folder}: {len(absent)} caption(s) not in the store, e.g. {absent[0]!r}")
        where = np.array([self._where[c] for c in captions], dtype=np.int64)
        return np.stack([where >> 32, where & 0xFFFFFFFF], axis=1)

    # ------------------------------------------------------------------ reading
    def read(self, locations):
        """float16 CPU tensors (rows, width), one per location, read from the memory-mapped shards."""
        rows = []
        for shard, k in np.asarray(locations).reshape(-1, 2).tolist():
            if shard not in self._open:
                handle = safe_open(os.path.join(self.folder, self._shards[shard]), framework="pt")
                self._open[shard] = (handle, handle.get_slice("features"), handle.get_tensor("offsets").numpy())
            _, features, offsets = self._open[shard]
            rows.append(features[int(offsets[k]):int(offsets[k + 1])])
        return rows

    # ------------------------------------------------------------------ writing
    def _write_shard(self, captions, rows):
        offsets = np.cumsum([0] + [len(r) for r in rows])
        features = torch.cat(rows).to(torch.float16)
        name = f"shard-{self._writer}-{self._written:05d}.safetensors"
        self._written += 1
        with misc.atomic_write(os.path.join(self.folder, name)) as tmp:
            save_file({"features": features, "offsets": torch.from_numpy(offsets).to(torch.int64)}, tmp,
                      metadata={"fingerprint": self.meta["fingerprint"],
                                "captions": json.dumps(captions, ensure_ascii=False)})
        self._add_shard(name, captions)

    def embed(self, llm, captions, batch_size=64, shard_bytes=SHARD_BYTES, show_progress=True):
        """Run the loaded LLM on `captions` (distinct, not yet stored) in batches; write a shard every shard_bytes.
        Returns (captions longer than llm.max_text_len tokens, the longest in tokens): the LLM reads only the first."""
        pending_captions, pending_rows, pending_bytes = [], [], 0
        truncated, longest = 0, 0
        with misc.progress_bar(total=len(captions), desc="embedding captions", unit="caption", disable=not show_progress) as bar:
            for start in range(0, len(captions), batch_size):
                chunk = captions[start:start + batch_size]
                rows = llm.features(chunk)
                token_counts = llm.token_counts(chunk)  # negligible beside the LLM's forward pass
                truncated += sum(n > llm.max_text_len for n in token_counts)
                longest = max([longest] + token_counts)
                lengths = [len(r) for r in rows]
                batch = torch.cat(rows).cpu()  # one float16 block per batch: few, large allocations
                if not torch.isfinite(batch).all() or batch.abs().max() > FLOAT16_MAX:
                    raise ValueError(f"{llm.name_or_path}: features of the captions {chunk[:3]}... are not "
                                     f"finite in float16 (largest magnitude {batch.abs().max().item():.4g})")
                batch = batch.to(torch.float16)
                del rows
                pending_captions += chunk
                pending_rows += list(batch.split(lengths))
                pending_bytes += batch.numel() * 2
                bar.update(len(chunk))
                if pending_bytes >= shard_bytes:
                    self._write_shard(pending_captions, pending_rows)
                    pending_captions, pending_rows, pending_bytes = [], [], 0
        if pending_captions:
            self._write_shard(pending_captions, pending_rows)
        return truncated, longest


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def report_truncated(counts, embedded, max_text_len):
    """One line on rank 0 when captions just embedded (by any rank) had more than max_text_len tokens, which the LLM
    never sees: how many, and the longest. Collective: every rank hands its (count, longest)."""
    counts = [counts]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        mine, counts = counts[0], [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(counts, mine)
    truncated, longest = sum(n for n, _ in counts), max(m for _, m in counts)
    if truncated and misc.is_main_process():
        print(f"{truncated} of {embedded} captions have more than --max_text_len {max_text_len} tokens (the longest "
              f"{longest}): the LLM reads only their first {max_text_len}")


def build_store(llm, captions, root=None, device="cpu", batch_size=64, shard_bytes=SHARD_BYTES,
                show_progress=True):
    """The CaptionStore of `llm` (a CaptionLLM, frozen) under root (default_root()) holding every caption; the missing
    ones are embedded first on `device`, split across the ranks of a torch.distributed group (every rank must call
    this), and captions the LLM reads only in part are reported (report_truncated). A rank loads the LLM's weights
    only if its share is not empty, and releases them before returning."""
    captions = list(captions)
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    root = default_root() if root is None else str(root)
    rank, world_size = misc.get_rank(), misc.get_world_size()
    if rank != 0:
        _barrier()  # rank 0 creates the store (its store.json) first: the others then only read it
    store = CaptionStore(store_folder(llm, root, device), llm, device)
    if rank == 0:
        _barrier()
    missing = store.missing(captions)
    _barrier()  # every rank has its list of missing captions before any rank adds a shard (the shares must agree)
    share = missing[rank::world_size]
    counts = (0, 0)
    if share:
        with llm.loaded(device):
            counts = store.embed(llm, share, batch_size=batch_size, shard_bytes=shard_bytes,
                                 show_progress=show_progress)
    report_truncated(counts, len(missing), llm.max_text_len)
    if rank == 0 and (missing or store.unindexed):
        store.write_index()
    _barrier()
    store.refresh()
    check_every_rank_sees(store, captions)
    return store


def check_every_rank_sees(store, captions):
    """Every rank must find every caption in the store, whichever rank embedded it: a store folder that is not on a
    disk every node shares (~/.cache on each node) would otherwise end in a KeyError at the first batch. One ValueError
    on every rank, naming the first rank (and host) that misses captions."""
    if not misc.is_dist_avail_and_initialized():  # one process embedded everything itself
        return
    views = [None] * misc.get_world_size()
    torch.distributed.all_gather_object(views, (len(store.missing(captions)), socket.gethostname()))
    for rank, (missing, host) in enumerate(views):
        if missing:
            raise ValueError(f"{store.folder}: rank {rank} on {host} does not see {missing} caption(s) that other "
                             f"ranks embedded into this caption store: it must be a folder every node shares (set "
                             f"$JIT_CACHE_DIR or --text_cache_dir to one)")
