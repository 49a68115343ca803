"""Sampling from the teachers, for previews and evaluation (free functions over the model).

- `sample_bidirectional`: Euler integration of the flow ODE over the whole clip (full attention).
- `sample_causal`: chunk by chunk through the streaming engine (block-causal context, the engine's
  x0-and-renoise steps), the way the causal teacher is used before distillation.
- `sampling_record`: the sampling and streaming settings a checkpoint was trained for, written into
  its metadata ("sampling"); `vidu stream --ckpt` starts from them and refuses what training never saw.
"""
from __future__ import annotations

import torch

from models.config import ModelConfig
from models.dit import DiT
from models.flow import SHIFT, sigmas as flow_sigmas, step_at_level

BIDIRECTIONAL_STEPS = 30     # Euler steps of the bidirectional teacher
CAUSAL_STEPS = 16            # steps per chunk of the causal teacher (and of `vidu stream` on a teacher)


@torch.no_grad()
def sample_bidirectional(model: DiT, cfg: ModelConfig, ref, text, audio=None, steps: int = BIDIRECTIONAL_STEPS, shift: float = SHIFT,
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
def sample_causal(model: DiT, cfg: ModelConfig, ref, text, audio=None, steps: int = CAUSAL_STEPS, shift: float = SHIFT,
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


def sampling_record(cfg: ModelConfig, stage: str, shift: float, chunk_frames: int, noisy_level: float | None,
                    codec: dict) -> dict:
    """What a checkpoint of `stage` trained on `cfg.latent_frames`-frame clips has seen, as streaming settings:

    - chunk_frames: the causal block size of training (the stream generates chunks of exactly this);
    - window, sink: the largest history the stream may keep so that ref + sink + window + chunk fits in
      the 1 + latent_frames positions training used (RoPE positions beyond them were never seen);
    - noisy_level: the highest history noise level of diffusion forcing (None: clean history only), so
      a TwinCache's noisy cache is taken at the first step whose noise level is at most it;
    - shift, steps: the flow schedule the stream samples with; codec: the latent space of training.
    """
    F, cf = cfg.latent_frames, chunk_frames
    sink = F - 2 * cf >= cf                              # room for a sink chunk and one history chunk
    window = max(cf, (F - cf - (cf if sink else 0)) // cf * cf)
    steps = CAUSAL_STEPS if stage == "causal" else BIDIRECTIONAL_STEPS
    noisy = step_at_level(noisy_level, steps, shift)
    return {"stage": stage, "shift": shift, "steps": steps, "chunk_frames": cf, "window": window, "sink": sink,
            "twin": noisy is not None, "noisy_step": noisy or 0, "noisy_level": noisy_level, "codec": codec}
