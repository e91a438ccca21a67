"""Text conditioning of -Text models: a frozen LLM turns a caption into the condition that replaces JiT's class
embedding (model_jit.JiT takes it as its y_embedder).

Two modes (--text_conditioning):
- pooled (default, the published design): the LLM's last hidden states mean-pooled over the real tokens and projected
  to the JiT width; this one vector drives adaLN (c = t_emb + y_emb) and fills the in-context tokens.
- tokens: the same pooled vector for adaLN and the in-context tokens, plus the last hidden states of every real token,
  projected to the JiT width with learned positions, as text tokens in front of the in-context tokens from block
  in_context_start on (unrotated, padding masked out of attention).

The frozen LLM is kept OUT of the module tree: never re-initialised, never in state_dict()/parameters()/EMA/
checkpoints. Each distinct caption goes through it once, into the caption feature store (util/text_store.py), which
the embedder reads per batch.
"""
import hashlib
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.llm import check_llm_folder

TEXT_CONDITIONINGS = ("pooled", "tokens")


class _SharedRef:
    """Holds an object outside nn.Module's registries; copy.deepcopy shares it instead of duplicating it."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class LLMTextEncoder(nn.Module):
    """Caption -> LLM last_hidden_state -> masked mean over the real tokens -> Linear(llm_hidden, hidden_size).

    pooled_features(captions) runs the LLM ((B, llm_hidden) float32); last_hidden_states(captions) gives the
    per-token states and their mask; features(captions) is what the caption store keeps for the conditioning mode
    (`conditioning`, part of the fingerprint); forward(pooled) is the trainable projection.
    Frozen (default): the LLM is a plain attribute (not a submodule): absent from state_dict(), parameters(),
    the EMA tracks and checkpoints, requires_grad False, always in eval mode; it still follows .to()/.cuda()/.cpu()
    of any parent module. Not frozen: the LLM is the registered, trainable submodule `llm` (keys llm.*).
    The LLM weights are never touched by any weight init. Compute policy: frozen LLM weights are bfloat16 on CUDA
    and float32 elsewhere (dtype casts of the parent such as .half() do not change this); a trainable LLM keeps
    float32 weights and runs under bfloat16 autocast on CUDA. Pooled features are always float32.
    """

    # the last part of the fingerprint: what the caption store holds per caption; change it if the features change
    FEATURES = {"pooled": "masked-mean-v1", "tokens": "last-hidden-tokens-v1"}

    def __init__(self, llm_name_or_path, hidden_size, max_text_len=77, freeze=True, conditioning="pooled"):
        super().__init__()
        import transformers
        from transformers import AutoModel, AutoTokenizer

        if conditioning not in TEXT_CONDITIONINGS:
            raise ValueError(f"--text_conditioning must be one of {TEXT_CONDITIONINGS}, got {conditioning!r}")
        self.conditioning = conditioning
        self.llm_name_or_path = str(llm_name_or_path)
        self.max_text_len = int(max_text_len)
        self.freeze = bool(freeze)
        check_llm_folder(self.llm_name_or_path)  # a local folder without config or tokenizer: one line, no traceback
        tokenizer = AutoTokenizer.from_pretrained(llm_name_or_path)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {llm_name_or_path} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        # right padding: the real tokens keep positions 0..n-1 whatever the batch, so a caption's features do
        # not depend on the other captions of its batch (up to kernel rounding, see util/text_store.py)
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        major_minor = tuple(int(v) for v in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
        llm = AutoModel.from_pretrained(llm_name_or_path, **{dtype_kw: torch.float32})
        self.llm_hidden_size = int(llm.config.hidden_size)
        if self.freeze:
            llm.requires_grad_(False)
            llm.eval()
            self._frozen_llm = _SharedRef(llm)  # plain attribute: not registered, not in state_dict
        else:
            self._frozen_llm = None
            self.add_module("llm", llm)
        self.proj = nn.Linear(self.llm_hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self._fingerprint = None

    # ------------------------------------------------------------------ the LLM and its device
    def __getattr__(self, name):
        if name == "llm" and self.__dict__.get("_frozen_llm") is not None:
            return self.__dict__["_frozen_llm"].obj
        return super().__getattr__(name)

    @property
    def llm_device(self):
        return next(self.llm.parameters()).device

    @property
    def llm_compute_dtype(self):
        """dtype the LLM computes in on its current device (bfloat16 on CUDA, float32 otherwise)."""
        return torch.bfloat16 if self.llm_device.type == "cuda" else torch.float32

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.freeze:
            llm = self.llm
            current = next(llm.parameters()).device
            target = fn(torch.empty(0, device=current)).device  # where the parent is being moved (dtype ignored)
            if target != current or next(llm.parameters()).dtype != self._frozen_dtype_for(target):
                llm.to(device=target, dtype=self._frozen_dtype_for(target))
        return self

    @staticmethod
    def _frozen_dtype_for(device):
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def train(self, mode=True):
        super().train(mode)
        if self.freeze:
            self.llm.eval()
        return self

    # ------------------------------------------------------------------ features
    def tokenize(self, captions):
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not a single string")
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_text_len,
                              return_tensors="pt")

    def last_hidden_states(self, captions):
        """((B, T, llm_hidden) float32 last hidden states, (B, T) attention mask) on the LLM's device; T is the
        longest caption of the batch (right padding, at most max_text_len tokens)."""
        batch = self.tokenize(captions)
        mask = batch["attention_mask"]
        empty = [c for c, n in zip(captions, mask.sum(1).tolist()) if n == 0]
        if empty:
            raise ValueError(f"captions with no tokens cannot be encoded: {empty[:5]}")
        device = self.llm_device
        input_ids, mask = batch["input_ids"].to(device), mask.to(device)
        if self.freeze:
            # fixed policy whatever autocast the caller is under: the weights already have the compute dtype
            with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
                hidden = self.llm(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:
            use_bf16 = device.type == "cuda"
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                hidden = self.llm(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask

    def pooled_features(self, captions):
        """(B, llm_hidden) float32 on the LLM's device: mean of last_hidden_state over the non-padding tokens."""
        hidden, mask = self.last_hidden_states(captions)
        weights = mask.to(torch.float32).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)

    def features(self, captions):
        """What the caption store keeps of each caption: a list of (rows, llm_hidden) float32 tensors on the CPU,
        one row (the pooled vector) per caption in pooled mode, one row per real token in tokens mode."""
        if self.conditioning == "pooled":
            return list(self.pooled_features(captions).cpu().unsqueeze(1))
        hidden, mask = self.last_hidden_states(captions)
        hidden = hidden.cpu()
        return [h[:n] for h, n in zip(hidden, mask.sum(1).tolist())]

    def forward(self, pooled):
        return self.proj(pooled)

    # ------------------------------------------------------------------ identity
    def fingerprint(self):
        """Short id of (LLM, tokenizer, max_text_len, features kept) for caption stores and checkpoints.

        The LLM weights are not hashed (too slow for multi-GB models): it is the name/path plus a hash of the
        config (without volatile fields such as transformers_version and dtype) and of the tokenizer's vocabulary.
        """
        if self._fingerprint is None:
            config = self.llm.config.to_dict()
            for key in ("transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype",
                        "_commit_hash", "_attn_implementation", "_attn_implementation_internal",
                        "_attn_implementation_autoset", "use_cache"):
                config.pop(key, None)
            config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False)
            vocab_hash = hashlib.sha256(vocab.encode()).hexdigest()[:12]
            self._fingerprint = (f"{self.llm_name_or_path}|config={config_hash}|vocab={len(self.tokenizer)}:"
                                 f"{vocab_hash}|max_text_len={self.max_text_len}|{self.FEATURES[self.conditioning]}")
        return self._fingerprint


class TextEmbedder(nn.Module):
    """The condition of -Text models: caption index -> LLM features -> projection to the JiT width.

    Indices point into the caption list given to set_captions (training captions, evaluation prompts); index -1 is
    the null caption of classifier-free guidance: a learned vector (never an empty, fully masked LLM input, which
    gives NaN with some attention kernels) and, in tokens mode, a learned null token. With a frozen LLM the features
    of a batch are read from the caption store (util/text_store.py), so training and sampling see the same rows bit
    for bit; with a trainable LLM they are computed in the step.
    forward returns y_emb (B, D) in pooled mode, (y_emb, text tokens (B, T, D), mask (B, T)) in tokens mode, where
    T is the longest caption of the batch and mask is False at padding.
    """

    def __init__(self, text_encoder, hidden_size):
        super().__init__()
        self.encoder = text_encoder
        self.conditioning = text_encoder.conditioning
        self.null_embedding = nn.Parameter(torch.zeros(1, hidden_size))
        nn.init.normal_(self.null_embedding, std=0.02)
        if self.conditioning == "tokens":
            self.token_proj = nn.Linear(text_encoder.llm_hidden_size, hidden_size)
            nn.init.xavier_uniform_(self.token_proj.weight)
            nn.init.zeros_(self.token_proj.bias)
            self.token_posemb = nn.Parameter(torch.zeros(1, text_encoder.max_text_len, hidden_size))
            nn.init.normal_(self.token_posemb, std=0.02)
            self.null_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
            nn.init.normal_(self.null_token, std=0.02)
        self.captions = []
        self._store = None  # _SharedRef to the CaptionStore: not module state, shared by copies
        self._locations = None

    def set_captions(self, captions, store=None):
        """Captions the indices refer to; with a frozen LLM also the CaptionStore that holds their features."""
        if self.encoder.freeze:
            if store is None:
                raise ValueError("a frozen text encoder reads caption features from a caption store (util/text_store)")
            self._locations = store.locate(captions)
            self._store = _SharedRef(store)
        self.captions = list(captions)

    def caption_features(self, caption_ids):
        """((B, T, llm_hidden) float32 features on the embedder's device, (B, T) bool mask), T the longest caption
        of the batch (1 in pooled mode); null captions (-1) are one all-zero row (replaced by the null parameters)."""
        device = self.null_embedding.device
        ids = caption_ids.tolist()
        real = [i for i in ids if i >= 0]
        if not real:
            rows = []
        elif self.encoder.freeze:
            rows = self._store.obj.read(self._locations[real])
        elif self.conditioning == "pooled":
            rows = list(self.encoder.pooled_features([self.captions[i] for i in real]).unsqueeze(1))
        else:
            hidden, mask = self.encoder.last_hidden_states([self.captions[i] for i in real])
            rows = [h[:n] for h, n in zip(hidden, mask.sum(1).tolist())]
        rows = iter(rows)
        null_row = torch.zeros(1, self.encoder.llm_hidden_size)
        rows = [next(rows) if i >= 0 else null_row for i in ids]
        lengths = torch.tensor([len(row) for row in rows], device=device)
        features = nn.utils.rnn.pad_sequence([row.to(device, torch.float32) for row in rows], batch_first=True)
        mask = torch.arange(features.shape[1], device=device) < lengths.unsqueeze(1)
        return features, mask

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
