"""Sampling from the teachers, for previews and evaluation (free functions over the model).

- `sample_bidirectional`: Euler integration of the flow ODE over the whole clip (full attention).
- `sample_causal`: chunk by chunk through the streaming engine (block-causal context, the engine's
  x0-and-renoise steps), the way the causal teacher is used before distillation.
"""
from __future__ import annotations

import torch

from models.config import ModelConfig
from models.dit import DiT
from models.flow import sigmas as flow_sigmas


@torch.no_grad()
def sample_bidirectional(model: DiT, cfg: ModelConfig, ref, text, audio=None, steps: int = 30, shift: float = 5.0,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ref [B, C, 1, h, w], text [B, L, D], audio [B, F, K, A] -> (video latent [B, C, F, h, w], audio latent)."""
    d, B = cfg.dit, ref.shape[0]
    dev, dt = ref.device, ref.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((B, d.in_dim, cfg.latent_frames, ref.shape[3], ref.shape[4]), generator=g).to(dev, dt)
    xa = (torch.randn((B, cfg.latent_frames, d.audio_latent_tokens, d.audio_latent_dim), generator=g).to(dev, dt)
          if d.joint_audio else None)
    sig = flow_sigmas(steps, shift) + [0.0]
    for s, s_next in zip(sig[:-1], sig[1:]):
        out = model(x, torch.full((B,), s * 1000.0, device=dev), text, audio=audio, audio_latent=xa, ref=ref)
        x = x + (s_next - s) * out.video.to(dt)
        if xa is not None:
            xa = xa + (s_next - s) * out.audio.to(dt)
    return x, xa


@torch.no_grad()
def sample_causal(model: DiT, cfg: ModelConfig, ref, text, audio=None, steps: int = 16, shift: float = 5.0,
                  seed: int = 0, chunk_frames: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same inputs as `sample_bidirectional` (batch 1), generated chunk by chunk with a window that
    holds the whole clip (the setting the causal teacher was trained in)."""
    from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
    F = cfg.latent_frames
    st = StreamSettings(chunk_frames=chunk_frames, steps=steps, shift=shift, window=max(F, chunk_frames) // chunk_frames
                        * chunk_frames, twin=False)
    eng = StreamEngine(model, cfg, st, seed=seed)
    eng.start(ref)
    vs, aus = [], []
    for c in range(0, F - F % chunk_frames, chunk_frames):
        a = None if audio is None else audio[:, c:c + chunk_frames]
        r = eng.step(ChunkInputs(text, a))
        vs.append(r.video)
        aus.append(r.audio)
    return torch.cat(vs, 2), (torch.cat(aus, 1) if aus[0] is not None else None)
