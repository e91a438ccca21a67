"""Text conditioning of -Text models: a frozen LLM turns a caption into the condition that replaces JiT's class
embedding (model_jit.JiT takes TextEmbedder as its y_embedder).

Two modes (--text_conditioning):
- pooled (default, the published design): the LLM's last hidden states mean-pooled over the real tokens and projected
  to the JiT width; this one vector drives adaLN (c = t_emb + y_emb) and fills the in-context tokens.
- tokens: the same pooled vector for adaLN and the in-context tokens, plus the last hidden states of every real token,
  projected to the JiT width with learned positions, as text tokens in front of the in-context tokens from block
  in_context_start on (unrotated, padding masked out of attention).

The frozen LLM lives outside the trained network, as DiT keeps its VAE: CaptionLLM (a plain object, not a module) owns
the tokenizer, the config, the feature extraction and the weights, which it loads only while captions are embedded
into the caption feature store (util/text_store.py) and releases after. The network holds only what trains: the
projection (TextProjection), the null embedding and the per-token path (TextEmbedder), which read the store per batch.
With --no-freeze_llm the LLM is trained, so it is an ordinary submodule (TextProjection.llm) instead.
"""
import gc
import hashlib
import json
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.llm import check_llm_folder
from util.text_store import build_store

TEXT_CONDITIONINGS = ("pooled", "tokens")


class CaptionLLM:
    """The LLM of -Text models: tokenizer and config at construction; weights only inside `with loaded(device)`.

    tokenize, last_hidden_states, pooled_features and features (what the caption store keeps per caption in the
    `conditioning` mode) run the frozen weights of loaded(), or the `model` given (a trainable LLM). The fingerprint
    (caption stores, checkpoints) needs no weights. Frozen weights are loaded in the dtype they compute in
    (compute_dtype: bfloat16 on CUDA, float32 elsewhere), straight onto the embedding device; features are float32.
    """

    # the last part of the fingerprint: what the caption store holds per caption; change it if the features change
    FEATURES = {"pooled": "masked-mean-v1", "tokens": "last-hidden-tokens-v1"}

    def __init__(self, name_or_path, max_text_len=77, conditioning="pooled"):
        from transformers import AutoConfig, AutoTokenizer

        if conditioning not in TEXT_CONDITIONINGS:
            raise ValueError(f"--text_conditioning must be one of {TEXT_CONDITIONINGS}, got {conditioning!r}")
        self.conditioning = conditioning
        self.name_or_path = str(name_or_path)
        self.max_text_len = int(max_text_len)
        check_llm_folder(self.name_or_path)  # a local folder without config or tokenizer: one line, no traceback
        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {self.name_or_path} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        # right padding: the real tokens keep positions 0..n-1 whatever the batch, so a caption's features do
        # not depend on the other captions of its batch (up to kernel rounding, see util/text_store.py)
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.config = AutoConfig.from_pretrained(self.name_or_path)
        self.hidden_size = int(self.config.hidden_size)
        self.model = None  # the frozen weights, only while loaded()
        self._fingerprint = None

    # ------------------------------------------------------------------ weights
    @staticmethod
    def compute_dtype(device):
        """dtype the frozen LLM computes in on `device` (bfloat16 on CUDA, float32 otherwise): part of a store's key."""
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def load_trainable(self):
        """The LLM to train (--no-freeze_llm): float32 weights on the CPU, to be moved with the network."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.name_or_path, dtype=torch.float32)

    @contextmanager
    def loaded(self, device):
        """The frozen weights in compute_dtype(device) on `device` for the duration of the block, then released
        (del + gc + the CUDA cache): after the captions are embedded nothing of the LLM stays on the host or GPU.
        transformers builds the model on the meta device and fills it from the checkpoint in the target dtype,
        so no float32 copy is made; device_map places it directly (it needs accelerate; without it the model is
        loaded on the CPU in the compute dtype and moved)."""
        from transformers import AutoModel
        from transformers.utils import is_accelerate_available

        device = torch.device(device)
        placement = {"device_map": device} if device.type != "cpu" and is_accelerate_available() else {}
        model = AutoModel.from_pretrained(self.name_or_path, dtype=self.compute_dtype(device), **placement)
        self.model = model.to(device).requires_grad_(False).eval()
        del model
        try:
            yield self.model
        finally:
            self.model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ features
    def tokenize(self, captions):
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not a single string")
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_text_len,
                              return_tensors="pt")

    def token_counts(self, captions):
        """Tokens of each caption before truncation to max_text_len (special tokens included, as tokenize counts)."""
        return [len(ids) for ids in self.tokenizer(list(captions), verbose=False)["input_ids"]]

    def last_hidden_states(self, captions, model=None):
        """((B, T, hidden) float32 last hidden states, (B, T) attention mask) on the model's device; T is the longest
        caption of the batch (right padding, at most max_text_len tokens). model: a trainable LLM, run under bfloat16
        autocast on CUDA; default the frozen weights of loaded(), run in their own dtype."""
        frozen = model is None
        model = self.model if frozen else model
        if model is None:
            raise RuntimeError(f"{self.name_or_path}: the LLM weights are not loaded (use `with llm.loaded(device):`)")
        batch = self.tokenize(captions)
        mask = batch["attention_mask"]
        empty = [c for c, n in zip(captions, mask.sum(1).tolist()) if n == 0]
        if empty:
            raise ValueError(f"captions with no tokens cannot be encoded: {empty[:5]}")
        device = next(model.parameters()).device
        input_ids, mask = batch["input_ids"].to(device), mask.to(device)
        if frozen:
            # fixed policy whatever autocast the caller is under: the weights already have the compute dtype
            with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
                hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask

    def pooled_features(self, captions, model=None):
        """(B, hidden) float32 on the model's device: mean of last_hidden_state over the non-padding tokens."""
        hidden, mask = self.last_hidden_states(captions, model)
        weights = mask.to(torch.float32).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)

    def features(self, captions, model=None):
        """What the caption store keeps of each caption: a list of (rows, hidden) float32 tensors, one row (the
        pooled vector) per caption in pooled mode, one row per real token in tokens mode."""
        if self.conditioning == "pooled":
            return list(self.pooled_features(captions, model).unsqueeze(1))
        hidden, mask = self.last_hidden_states(captions, model)
        return [h[:n] for h, n in zip(hidden, mask.sum(1).tolist())]

    # ------------------------------------------------------------------ identity
    def fingerprint(self):
        """Short id of (LLM, tokenizer, max_text_len, features kept) for caption stores and checkpoints.

        The LLM weights are not hashed (too slow for multi-GB models): it is the name/path plus a hash of the
        config (without volatile fields such as transformers_version and dtype) and of the tokenizer's vocabulary.
        """
        if self._fingerprint is None:
            config = self.config.to_dict()
            for key in ("transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype",
                        "_commit_hash", "_attn_implementation", "_attn_implementation_internal",
                        "_attn_implementation_autoset", "use_cache"):
                config.pop(key, None)
            config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False)
            vocab_hash = hashlib.sha256(vocab.encode()).hexdigest()[:12]
            self._fingerprint = (f"{self.name_or_path}|config={config_hash}|vocab={len(self.tokenizer)}:"
                                 f"{vocab_hash}|max_text_len={self.max_text_len}|{self.FEATURES[self.conditioning]}")
        return self._fingerprint


class TextProjection(nn.Module):
    """Linear(LLM hidden, hidden_size) from the pooled LLM features to y_emb (keys proj.weight|bias). With a trainable
    LLM (--no-freeze_llm) the LLM is its submodule `llm` (keys llm.*: trained, in the EMA and checkpoints)."""

    def __init__(self, caption_llm, hidden_size, freeze=True):
        super().__init__()
        self.freeze = bool(freeze)
        if not self.freeze:
            # before the projection's init draws: the initial weights of a seed depend on the order
            self.llm = caption_llm.load_trainable()
        self.proj = nn.Linear(caption_llm.hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pooled):
        return self.proj(pooled)


def trainable_llm_warning(llm):
    """One line for the log of a --no-freeze_llm run: what training the LLM costs on each rank's device."""
    n = sum(p.numel() for p in llm.parameters())
    # float32 weights, gradients, AdamW's two moments and the two EMA tracks: 6 x 4 bytes per parameter
    return (f"warning: --no-freeze_llm trains the LLM's {n / 1e9:.2f}B parameters: with their gradients, AdamW's "
            f"two moments and both EMA tracks they take {24 * n / 1e9:.1f} GB on each rank's device (frozen: none)")


class TextEmbedder(nn.Module):
    """The condition of -Text models: caption index -> LLM features -> projection to the JiT width.

    Indices point into the caption list given to set_captions (training captions, evaluation prompts); index -1 is
    the null caption of classifier-free guidance: a learned vector (never an empty, fully masked LLM input, which
    gives NaN with some attention kernels) and, in tokens mode, a learned null token. With a frozen LLM the features
    of a batch are read from the caption store (util/text_store.py), so training and sampling see the same rows bit
    for bit; with a trainable LLM they are computed in the step.
    forward returns y_emb (B, D) in pooled mode, (y_emb, text tokens (B, T, D), mask (B, T)) in tokens mode, where
    T is the longest caption of the batch and mask is False at padding.
    caption_llm and the store are plain attributes: neither is module state (state_dict, parameters, .to()).
    """

    def __init__(self, caption_llm, encoder, hidden_size):
        super().__init__()
        self.caption_llm = caption_llm
        self.encoder = encoder
        self.conditioning = caption_llm.conditioning
        self.null_embedding = nn.Parameter(torch.zeros(1, hidden_size))
        nn.init.normal_(self.null_embedding, std=0.02)
        if self.conditioning == "tokens":
            self.token_proj = nn.Linear(caption_llm.hidden_size, hidden_size)
            nn.init.xavier_uniform_(self.token_proj.weight)
            nn.init.zeros_(self.token_proj.bias)
            self.token_posemb = nn.Parameter(torch.zeros(1, caption_llm.max_text_len, hidden_size))
            nn.init.normal_(self.token_posemb, std=0.02)
            self.null_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
            nn.init.normal_(self.null_token, std=0.02)
        self.captions = []
        self.store = None
        self._locations = None

    def set_captions(self, captions, store=None):
        """Captions the indices refer to; with a frozen LLM also the CaptionStore that holds their features."""
        if self.encoder.freeze:
            if store is None:
                raise ValueError("a frozen LLM's caption features are read from a caption store (util/text_store)")
            self._locations = store.locate(captions)
            self.store = store
        self.captions = list(captions)

    def use_captions(self, captions, cache_dir=None, show_progress=True):
        """Captions the indices refer to, with a frozen LLM read from the caption store under cache_dir (default
        util/text_store.default_root()), the missing ones embedded first on the embedder's device (split across the
        ranks; the LLM's weights are released after). The one set-up of training, sample.py and bench.py; a store of
        another LLM, or features out of float16 range, is a ValueError naming its folder."""
        store = (build_store(self.caption_llm, captions, cache_dir, device=self.null_embedding.device,
                             show_progress=show_progress) if self.encoder.freeze else None)
        self.set_captions(captions, store)

    def caption_features(self, caption_ids):
        """((B, T, llm_hidden) float32 features on the embedder's device, (B, T) bool mask), T the longest caption
        of the batch (1 in pooled mode); null captions (-1) are one all-zero row (replaced by the null parameters)."""
        device = self.null_embedding.device
        ids = caption_ids.tolist()
        real = [i for i in ids if i >= 0]
        if not real:
            rows = []
        elif self.encoder.freeze:
            rows = self.store.read(self._locations[real])  # float16 rows on the CPU
        else:
            rows = self.caption_llm.features([self.captions[i] for i in real], model=self.encoder.llm)
        like = rows[0] if rows else torch.zeros(0, self.caption_llm.hidden_size)
        null_row = like.new_zeros(1, like.shape[1])
        rows = iter(rows)
        # each row with one more column of ones, which padding leaves at 0: the mask travels in the same tensor, so
        # a batch of store rows reaches the GPU in one copy (not one per caption)
        padded = nn.utils.rnn.pad_sequence([F.pad(next(rows) if i >= 0 else null_row, (0, 1), value=1) for i in ids],
                                           batch_first=True)
        if padded.device != device:
            padded = padded.pin_memory() if device.type == "cuda" else padded
            padded = padded.to(device, non_blocking=True)
        return padded[..., :-1].float(), padded[..., -1] > 0

    def forward(self, caption_ids):
        if len(self.captions) == 0:
            raise RuntimeError("no captions set: call net.y_embedder.set_captions(captions, store) first")
        features, mask = self.caption_features(caption_ids)
        null = (caption_ids < 0).to(features.device)
        if self.conditioning == "pooled":
            pooled = features[:, 0]
        else:  # the adaLN vector of tokens mode: the same masked mean over the real tokens as pooled mode
            weights = mask.to(torch.float32).unsqueeze(-1)
            pooled = (features * weights).sum(dim=1) / weights.sum(dim=1)
        emb = self.encoder(pooled)
        emb = torch.where(null.unsqueeze(1), self.null_embedding.to(emb.dtype), emb)
        if self.conditioning == "pooled":
            return emb
        tokens = self.token_proj(features)
        tokens = tokens + self.token_posemb[:, :tokens.shape[1]].to(tokens.dtype)
        null_sequence = F.pad(self.null_token, (0, 0, 0, tokens.shape[1] - 1)).to(tokens.dtype)  # length 1, masked pad
        tokens = torch.where(null[:, None, None], null_sequence, tokens)
        return emb, tokens, mask
