"""JiT: Just image Transformer (Li & He, "Back to Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720).

The network predicts the clean image from a noisy one. Module and parameter names follow the published
release exactly, so official checkpoints load without remapping. The condition is a class embedding; -Text
models pass a caption embedder instead (text_conditioning.py), optionally with text tokens (`context`) that join the
in-context tokens.
"""
import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("sdpa", "fp32")  # fused kernel, or the release's float32 logits + softmax (bit-faithful evaluation)
# A CPU training step runs attention over at most this many tokens as matmul + softmax: torch's fused CPU kernel is
# slower there, its bf16 backward above all (README, Benchmark); beyond it, and without gradients (sampling), the
# fused kernel stays, which holds no (tokens x tokens) matrices
CPU_MATMUL_ATTENTION_MAX_TOKENS = 256


def modulate(x, shift, scale):
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # x * (1 + scale) + shift, one kernel


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # float32 statistics and weight product even under bf16 autocast, as the release does
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class BottleneckPatchEmbed(nn.Module):
    """Patchify with a low-rank bottleneck: p x p x 3 pixels -> bottleneck_dim -> hidden_size."""

    def __init__(self, patch_size, in_channels, bottleneck_dim, hidden_size):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, kernel_size=1, bias=True)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)  # (B, N, D), row-major tokens


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the raw t in [0, 1] (cos first), then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding; index num_classes is the null (unconditional) label used for guidance."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


def rope_rotations(rope_cos, rope_sin):
    """(cos, sin) of every adjacent channel pair: (rows, head_dim // 2, 2), float32 (float64 for a float64 model)."""
    dtype = torch.promote_types(rope_cos.dtype, torch.float32)
    return torch.stack((rope_cos[:, 0::2], rope_sin[:, 0::2]), dim=-1).to(dtype)


def apply_rope(x, rotations):
    """x * cos + rotate_half(x) * sin with rotate_half(x0, x1, ...) = (-x1, x0, ...): each adjacent channel pair
    (x0, x1) multiplied by cos + i sin, as one complex product (no rotate_half copy, no stack). float32 out for
    float32 or lower inputs, as in the release."""
    x = x.to(rotations.dtype)
    if torch.compiler.is_compiling():  # inductor has no complex kernels; it fuses the same product written out
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rotations.unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    rotations = torch.view_as_complex(rotations)
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotations).flatten(-2)


def rope_2d_tables(head_dim, grid_size, num_prefix_tokens, theta=10000.0):
    """cos/sin tables (num_prefix_tokens + grid_size**2, head_dim) of 2-D axial RoPE; prefix rows are unrotated."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half)
    axis = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs).repeat_interleave(2, dim=-1)
    rows = axis[:, None, :].expand(grid_size, grid_size, half)
    cols = axis[None, :, :].expand(grid_size, grid_size, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    cos = torch.cat([torch.ones(num_prefix_tokens, head_dim), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix_tokens, head_dim), angles.sin()])
    return cos, sin


@contextlib.contextmanager
def cpu_attention(kind):
    """Attention of the CPU training steps inside (bench.py --cpu_attention, and activation memory as a GPU keeps
    it): "matmul" as set above, "fused" torch's fused kernel at every length, as on a GPU."""
    global CPU_MATMUL_ATTENTION_MAX_TOKENS
    limit = CPU_MATMUL_ATTENTION_MAX_TOKENS
    CPU_MATMUL_ATTENTION_MAX_TOKENS = limit if kind == "matmul" else 0
    try:
        yield
    finally:
        CPU_MATMUL_ATTENTION_MAX_TOKENS = limit


def matmul_attention(q, k, v, mask=None, dropout_p=0.0):
    """The release's attention: logits q k^T / sqrt(head_dim) and their softmax in float32 (autocast off), dropout on
    the probabilities, then probabilities @ v in the autocast dtype. mask as in Attention.forward."""
    device_type = q.device.type
    with torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else \
            contextlib.nullcontext():
        logits = q.float() @ k.float().transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
    # probabilities in v's dtype: what autocast would round them to, and bf16 v without autocast works too
    return torch.dropout(torch.softmax(logits, dim=-1), dropout_p, train=True).to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0, attn_impl="sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # registration order = official state_dict / parameter order (q_norm, k_norm before qkv)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_impl = attn_impl

    def forward(self, x, rope, mask=None):
        """mask: None, or (B, 1, 1, N) bool, False for keys no query may attend to (padding of text tokens)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        # RoPE with float32 tables: q and k come out in float32, as in the release
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.attn_impl == "sdpa":
            q, k = q.to(v.dtype), k.to(v.dtype)  # a fused kernel takes one dtype: bf16 q and k under bf16 autocast
        elif self.attn_impl != "fp32":
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        cpu_training = x.device.type == "cpu" and torch.is_grad_enabled() and N <= CPU_MATMUL_ATTENTION_MAX_TOKENS
        if self.attn_impl == "fp32" or cpu_training:
            # "sdpa" here: the fused kernels' numerics (float32 logits and softmax of the rounded q and k)
            x = matmul_attention(q, k, v, mask, dropout_p)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        hidden_dim = int(hidden_dim * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(a) * b))


class JiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, attn_impl="sdpa"):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, attn_impl=attn_impl)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLUFFN(hidden_size, int(hidden_size * mlp_ratio), drop=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope, mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        # x + gate * branch(x) as one addcmul each
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(h, rope) if mask is None else self.attn(h, rope, mask))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """MAE 2-D sin-cos table (grid_size**2, embed_dim): first half encodes the column, second half the row."""

    def sincos_1d(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = torch.outer(pos.reshape(-1), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1).float()


class JiT(nn.Module):
    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=1024, depth=24, num_heads=16,
                 mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, num_classes=1000, bottleneck_dim=128,
                 in_context_len=32, in_context_start=8, attn_impl="sdpa", y_embedder=None):
        """y_embedder: None for the class embedding (LabelEmbedder, built where the release builds its label table, so
        a seed gives the release's initial weights), or a callable hidden_size -> condition module (-Text models: its
        draws replace the label table's, and the text projection is drawn before the network, so every random tensor
        of a -Text model differs from the class model's of the same seed)."""
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"img_size {input_size} is not a multiple of the patch size {patch_size}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.grid_size = input_size // patch_size

        self.t_embedder = TimestepEmbedder(hidden_size)
        # the condition: a class embedding, or for -Text models a caption embedder (text_conditioning.TextEmbedder)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if y_embedder is None else y_embedder(hidden_size)
        self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        if in_context_len > 0:
            # drawn here, between the patch embedding and the blocks, as the release does: the same seed then
            # gives the release's initial weights (every later module's default init consumes the same draws)
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
            nn.init.normal_(self.in_context_posemb, std=0.02)
        # RoPE tables follow .to(device) but stay out of the state_dict; the first in_context_len rows
        # (unrotated) are used from block in_context_start on, when the in-context tokens are in the sequence
        rope_cos, rope_sin = rope_2d_tables(hidden_size // num_heads, self.grid_size, in_context_len)
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

        # dropout only in the middle of the network, with the release's bounds: depth // 4 * 3, not 3 * depth // 4
        # (equal for depths divisible by 4; JiT-T's depth 6 gives blocks 1-2, not 1-3)
        dropout_blocks = range(depth // 4, depth // 4 * 3)
        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio,
                     attn_drop=attn_drop if i in dropout_blocks else 0.0,
                     proj_drop=proj_drop if i in dropout_blocks else 0.0, attn_impl=attn_impl)
            for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # the condition embedder initialises itself: a pretrained LLM inside it must never be re-initialised
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("y_embedder."):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x):
        """(B, g*g, p*p*C) -> (B, C, g*p, g*p)."""
        g, p, c = self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y):
        """x: (B, C, H, W) noisy image, t: (B,) time (1 = clean), y: (B,) labels. Returns the clean-image estimate."""
        cond = self.y_embedder(y)  # (B, D), or (y_emb, context tokens, their mask) from a per-token text embedder
        return self.forward_with_cond_embedding(x, t, *cond) if isinstance(cond, tuple) else \
            self.forward_with_cond_embedding(x, t, cond)

    def forward_with_cond_embedding(self, x, t, y_emb, context=None, context_mask=None):
        """Same as forward, with the condition given as a (B, D) vector in place of the class embedding.

        context (B, T, D), optional: more condition tokens (a caption's text tokens), prepended to the in-context
        tokens from block in_context_start on and, like them, not rotated by RoPE; context_mask (B, T) bool is
        False at padding, which no token attends to."""
        c = self.t_embedder(t) + y_emb
        x = self.x_embedder(x) + self.pos_embed
        L = self.in_context_len
        rope = rope_rotations(self.rope_cos, self.rope_sin)
        rope_from_start, mask_from_start, prefix_len = rope, None, L
        if context is not None:
            T = context.shape[1]
            identity = torch.stack((torch.ones_like(rope[:T, :, 0]), torch.zeros_like(rope[:T, :, 0])), dim=-1)
            rope_from_start = torch.cat([identity.expand(T, -1, -1), rope])
            keep = torch.ones(x.shape[0], L + x.shape[1], dtype=torch.bool, device=x.device)
            mask_from_start = torch.cat([context_mask.to(torch.bool), keep], dim=1)[:, None, None, :]
            prefix_len = T + L
        for i, block in enumerate(self.blocks):
            if i == self.in_context_start:
                prefix = [] if context is None else [context.to(x.dtype)]
                if L > 0:
                    prefix.append((y_emb.unsqueeze(1).expand(-1, L, -1) + self.in_context_posemb).to(x.dtype))
                x = torch.cat(prefix + [x], dim=1) if prefix else x
            if i >= self.in_context_start:
                x = block(x, c, rope_from_start, mask_from_start)
            else:  # the image tokens alone: the rows after the unrotated in-context rows
                x = block(x, c, rope[L:])
        x = self.final_layer(x[:, prefix_len:], c)
        return self.unpatchify(x)


def _config(depth, hidden_size, num_heads, bottleneck_dim, in_context_start, patch_size, in_context_len=32):
    return functools.partial(JiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                             bottleneck_dim=bottleneck_dim, in_context_len=in_context_len,
                             in_context_start=in_context_start, patch_size=patch_size)


JiT_models = {
    # published configs (B/L/H released; G is in the paper only)
    "JiT-B/16": _config(12, 768, 12, 128, 4, 16),
    "JiT-B/32": _config(12, 768, 12, 128, 4, 32),
    "JiT-L/16": _config(24, 1024, 16, 128, 8, 16),
    "JiT-L/32": _config(24, 1024, 16, 128, 8, 32),
    "JiT-H/16": _config(32, 1280, 16, 256, 10, 16),
    "JiT-H/32": _config(32, 1280, 16, 256, 10, 32),
    "JiT-G/16": _config(40, 1664, 16, 256, 10, 16),
    "JiT-G/32": _config(40, 1664, 16, 256, 10, 32),
    # small configs for CPU experiments; NOT from the paper
    "JiT-T/2": _config(6, 192, 3, 32, 2, 2, in_context_len=8),
    "JiT-T/4": _config(6, 192, 3, 32, 2, 4, in_context_len=8),
    "JiT-S/2": _config(12, 384, 6, 64, 4, 2, in_context_len=16),
    "JiT-S/4": _config(12, 384, 6, 64, 4, 4, in_context_len=16),
}
# text-to-image variants: the same networks, built by Denoiser with a caption embedder (text_conditioning.py)
JiT_models.update({f"{name}-Text": builder for name, builder in list(JiT_models.items())})
