"""Denoiser: wraps the JiT network with the x-prediction / v-loss objective, the ODE sampler and two EMA tracks.

As in the JiT release (github.com/LTH14/JiT; arXiv 2511.13720): t = 0 is pure noise and t = 1 the clean image,
z_t = t x + (1 - t) e with e = noise_scale * N(0, I) and t = sigmoid(P_std * N(0, 1) + P_mean); the network predicts
x, the loss is measured on v = (x - z) / max(1 - t, t_eps). Random draws, in this order: label drop, t, e in
training; the initial noise first in sampling.
"""
import functools
from contextlib import contextmanager

import torch
import torch.nn as nn

from model_jit import JiT_models
from text_conditioning import CaptionLLM, TextEmbedder, TextProjection
from util.args import SAMPLING_METHODS, is_text_model, training_args
from util.checkpoint import PRETRAINED_FIELDS, load_pretrained, read_pretrained_config


class Denoiser(nn.Module):
    def __init__(self, args, with_ema=True):
        """args: main_jit.py's flags; with_ema False builds a Denoiser for sampling only, without the EMA tracks."""
        super().__init__()
        build = JiT_models[args.model]
        text = is_text_model(args)
        y_embedder = None
        if text:
            # the LLM's tokenizer and config only: its frozen weights are loaded while captions are embedded
            caption_llm = CaptionLLM(args.llm_model_name, max_text_len=args.max_text_len,
                                     conditioning=args.text_conditioning)
            projection = TextProjection(caption_llm, build.keywords["hidden_size"], freeze=args.freeze_llm)
            y_embedder = functools.partial(TextEmbedder, caption_llm, projection)
        self.net = build(input_size=args.img_size, in_channels=3, num_classes=args.class_num,
                         attn_drop=args.attn_dropout, proj_drop=args.proj_dropout, attn_impl=args.attn_impl,
                         y_embedder=y_embedder)
        self.img_size = args.img_size
        # the label of the unconditional branch: the extra class row, or caption index -1 for text models
        self.null_label = -1 if text else args.class_num
        self.label_drop_prob = args.label_drop_prob
        self.P_mean = args.P_mean
        self.P_std = args.P_std
        self.t_eps = args.t_eps
        self.noise_scale = args.noise_scale

        self.sampling_method = args.sampling_method
        self.num_sampling_steps = args.num_sampling_steps
        self.cfg_scale = args.cfg
        self.cfg_interval = (args.interval_min, args.interval_max)

        # EMA tracks are plain tensor lists aligned with self.parameters(): outside the state_dict (which holds
        # exactly the official keys) and outside DDP's buffer broadcast; _apply moves them with the model
        self.ema_decays = (args.ema_decay1, args.ema_decay2) if with_ema else ()
        self.ema_params = [[p.detach().clone() for p in self.parameters()] for _ in self.ema_decays]

    @classmethod
    def from_pretrained(cls, folder, **overrides):
        """The sampling Denoiser (eval mode, no EMA tracks) of a folder written by export.py, with config fields or
        attn_impl overridden, e.g. llm_model_name=<local copy of the LLM>, cfg=3.0; one-line errors naming the file."""
        config = read_pretrained_config(folder)
        known = PRETRAINED_FIELDS + ("attn_impl",)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"from_pretrained: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        model = cls(training_args({name: config[name] for name in PRETRAINED_FIELDS}, **overrides), with_ema=False)
        load_pretrained(model, folder, config)
        return model.eval()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.ema_params = [[fn(t) for t in track] for track in self.ema_params]
        return self

    # ------------------------------------------------------------------ training
    def drop_labels(self, labels, u=None):
        """Null label where u < label_drop_prob; u (B,) uniforms are drawn from the global RNG unless given (the
        validation loss gives fixed ones)."""
        u = torch.rand(labels.shape[0], device=labels.device) if u is None else u
        return torch.where(u < self.label_drop_prob, torch.full_like(labels, self.null_label), labels)

    def sample_t(self, n, device=None, generator=None):
        return torch.sigmoid(torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean)

    def forward(self, x, labels, t=None, noise=None):
        """Training loss. t (B,) and noise (like x) may be given to make a step reproducible across layouts."""
        labels = self.drop_labels(labels) if self.training else labels
        if t is None:
            t = self.sample_t(x.shape[0], device=x.device)
        t = t.view(-1, *([1] * (x.ndim - 1)))
        e = noise if noise is not None else torch.randn_like(x) * self.noise_scale
        z = t * x + (1 - t) * e
        v = (x - z) / (1 - t).clamp_min(self.t_eps)
        x_pred = self.net(z, t.flatten(), labels)
        v_pred = (x_pred - z) / (1 - t).clamp_min(self.t_eps)
        return ((v - v_pred) ** 2).mean(dim=(1, 2, 3)).mean()

    # ------------------------------------------------------------------ sampling
    # cfg and steps may be given per call (an evaluation sweep, a benchmark's warm-up); None: --cfg,
    # --num_sampling_steps
    def time_grid(self, steps=None, device=None):
        """The sampler's times: torch.linspace(0, 1, steps + 1) in float32, as the release builds them."""
        steps = self.num_sampling_steps if steps is None else steps
        return torch.linspace(0.0, 1.0, steps + 1, device=device)

    def guidance_weights(self, grid, cfg=None):
        """The guidance weight at each time of `grid`: cfg where low < t < high (low == 0 includes t = 0), else 1.
        Decided on the float32 grid with the release's expression: at 30, 60, 120 or 240 steps the point meant as
        0.1 is just above float32(0.1), so an interval starting at 0.1 guides there, as published."""
        low, high = self.cfg_interval
        cfg = self.cfg_scale if cfg is None else cfg
        guided = (grid < high) & ((low == 0) | (grid > low))
        return [cfg if g else 1.0 for g in guided.tolist()]

    def velocity(self, z, t, w, labels):
        """Velocity at time t ((B, 1, 1, 1)) guided with weight w: v_u + w (v_c - v_u)."""
        denom = (1.0 - t).clamp_min(self.t_eps)
        if w == 1.0:  # v_u + 1 * (v_c - v_u) = v_c: the null-label pass would not change the result
            return (self.net(z, t.flatten(), labels) - z) / denom
        null = torch.full_like(labels, self.null_label)
        x_cond, x_uncond = self.net(torch.cat([z, z]), t.flatten().repeat(2), torch.cat([labels, null])).chunk(2)
        v_cond, v_uncond = (x_cond - z) / denom, (x_uncond - z) / denom
        return v_uncond + w * (v_cond - v_uncond)

    def step_methods(self, steps=None):
        """The method of each ODE step: --sampling_method, but the last step is always Euler, so the network is never
        queried at t = 1."""
        steps = self.num_sampling_steps if steps is None else steps
        if self.sampling_method not in SAMPLING_METHODS:
            raise ValueError(f"--sampling_method must be one of {', '.join(SAMPLING_METHODS)}, got "
                             f"{self.sampling_method!r}")
        return [self.sampling_method] * (steps - 1) + ["euler"]

    def network_evaluations(self):
        """Network evaluations per sample of generate(): one velocity per Euler step, two per Heun step, each doubled
        by the null-label pass where the guidance weight is not 1."""
        weights = self.guidance_weights(self.time_grid(device="cpu"))  # a count: on any device
        methods = self.step_methods()
        return sum(1 if w == 1.0 else 2 for i, m in enumerate(methods) for w in weights[i:i + (2 if m == "heun" else 1)])

    @torch.no_grad()
    def generate(self, labels, cfg=None, steps=None, on_step=None):
        """Samples for labels (B,); on_step() is called after every ODE step (progress bars)."""
        bsz = labels.shape[0]
        z = self.noise_scale * torch.randn(bsz, 3, self.img_size, self.img_size, device=labels.device)
        grid = self.time_grid(steps, labels.device)
        # decided on the sampling device's grid, as the release does; a meta grid (FLOP counting) has no values
        weights = self.guidance_weights(self.time_grid(steps, "cpu") if grid.is_meta else grid, cfg)
        times = grid.view(-1, 1, 1, 1, 1).expand(-1, bsz, 1, 1, 1)
        for i, m in enumerate(self.step_methods(steps)):
            args = (z, times[i], times[i + 1], weights[i], weights[i + 1], labels)
            z = self.heun_step(*args) if m == "heun" else self.euler_step(*args)
            if on_step is not None:
                on_step()
        return z

    def euler_step(self, z, t, t_next, w, w_next, labels):
        return z + (t_next - t) * self.velocity(z, t, w, labels)

    def heun_step(self, z, t, t_next, w, w_next, labels):
        v_t = self.velocity(z, t, w, labels)
        z_euler = z + (t_next - t) * v_t
        v_t_next = self.velocity(z_euler, t_next, w_next, labels)
        return z + (t_next - t) * (0.5 * (v_t + v_t_next))

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_ema(self):
        params = [p.detach() for p in self.parameters()]
        for track, decay in zip(self.ema_params, self.ema_decays):
            # ema + (1 - decay) * (param - ema) = decay * ema + (1 - decay) * param, one pass over the track
            torch._foreach_lerp_(track, params, 1 - decay)

    def ema_state_dict(self, track):
        """Full state dict (official keys) holding EMA track 1 or 2, as in a checkpoint's model_ema1/model_ema2. Its
        tensors are the track itself, as state_dict() holds the live weights: no copy on the device at each save."""
        state = self.state_dict()
        names = [name for name, _ in self.named_parameters()]
        state.update({name: t.detach() for name, t in zip(names, self.ema_params[track - 1])})
        return state

    @torch.no_grad()
    def load_ema_state_dict(self, track, state_dict):
        for t, (name, _) in zip(self.ema_params[track - 1], self.named_parameters()):
            t.copy_(state_dict[name])

    @contextmanager
    def ema_weights(self, track=1):
        """Temporarily swap EMA track 1 or 2 into the network (for sampling); the live weights come back after.
        Track 0 is the live weights themselves (short runs, whose EMA is still mostly the initial weights)."""
        if track == 0:
            yield self
            return
        params = [p.data for p in self.parameters()]
        live = [p.clone() for p in params]
        torch._foreach_copy_(params, self.ema_params[track - 1])
        try:
            yield self
        finally:
            torch._foreach_copy_(params, live)
