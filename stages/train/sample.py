"""Sampling from the teachers, for previews and evaluation (free functions over the model).

- `sample_bidirectional`: Euler integration of the flow ODE over the whole clip (full attention); a clip
  longer than the model's in overlapping windows, the overlap held to what the window before made.
- `sample_causal`: chunk by chunk through the streaming engine (block-causal context, the engine's
  Euler sampler), the way the causal teacher is used before distillation.
- `sampling_record`: the sampling and streaming settings a checkpoint was trained for, written into
  its metadata ("sampling"); `vidu stream --ckpt` starts from them and refuses what training never saw.

Both samplers take a classifier-free guidance scale (1 = off): v = v_u + g (v_c - v_u), the
unconditional pass with text and speech nulled as condition dropout nulls them, or the text alone
(`guide`, models.dit.guided_conditions), the reference kept (it is the identity). TEACHER_GUIDANCE is the
teachers' default, and what their checkpoints record for `vidu stream`.
"""
from __future__ import annotations

import numpy as np
import torch

from models.config import ModelConfig
from models.dit import DiT, guided, guided_conditions
from models.flow import SHIFT, add_noise, sigmas as flow_sigmas, step_at_level, timestep

BIDIRECTIONAL_STEPS = 30     # Euler steps of the bidirectional teacher
OVERLAP = 3                  # latent frames a window of a clip longer than the model's holds from the one before
CAUSAL_STEPS = 16            # steps per chunk of the causal teacher (and of `vidu stream` on a teacher)
TEACHER_GUIDANCE = 2.0       # classifier-free guidance scale of the teachers' samplers (trained with condition dropout)
# how a teacher checkpoint streams by default (its "sampling" record, `vidu stream --ckpt`), measured on the
# small causal teacher streaming 48 held-out 8-s cases (benchmarks/RESULTS.md, session 29): x0-and-renoise
# with guidance 3 on the instruction alone (speech kept in the unconditional pass) performs 32 % of 146
# instructions at lip-sync r 0.58; unguided, 3 % at r 0.56; guidance 5 on the text, 16 % at r 0.50 and 63
# spurious actions a minute. Guidance on text and speech together (2.0) and chunk-by-chunk Euler broke the
# stream into blotches (session 26).
STREAM_SAMPLER, STREAM_GUIDANCE, STREAM_GUIDE = "renoise", 3.0, "text"


@torch.no_grad()
def sample_bidirectional(model: DiT, cfg: ModelConfig, ref, text, audio=None, steps: int = BIDIRECTIONAL_STEPS,
                         shift: float = SHIFT, seed: int = 0, guidance: float = TEACHER_GUIDANCE,
                         guide: str = "all", frames: int | None = None,
                         overlap: int = OVERLAP, progress=None,
                         voice: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ref [B, C, 1, h, w], text [B, L, D] or a text per latent frame [B, F, L, D], audio [B, before + F + after,
    K, A] -> (video latent [B, C, F, h, w], audio latent), F = `frames` (default the model's clip length,
    cfg.latent_frames). With guidance != 1, one forward of batch 2B per step.

    A clip longer than the model's is sampled in windows of cfg.latent_frames latent frames (`windows`), each
    starting `overlap` frames before the previous one ended, those frames held to what the previous window
    made: at every step they are set to the flow's point between their known value and the window's noise
    at that step's level (x_s = (1 - s) x0 + s eps), so the new frames are denoised in their context and
    the held ones come out exactly as made. Each window reads its own frames' texts and speech.
    `progress(done, windows)` is called after each window (a long clip's sampling can be followed).
    `voice` [B]: the character voice of each row's joint audio (DiTConfig.voices), in both guidance passes."""
    d, B = cfg.dit, ref.shape[0]
    F = frames or cfg.latent_frames
    before, after = d.audio_context
    if text.dim() == 4 and text.shape[1] != F:
        raise ValueError(f"{text.shape[1]} per-frame texts for {F} latent frames")
    if audio is not None and audio.shape[1] != before + F + after:
        raise ValueError(f"speech features cover {audio.shape[1]} frames; {F} latent frames need {before + F + after}")
    dev, dt = ref.device, ref.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    two = guidance != 1.0
    rows = 2 * B if two else B
    if two:
        ref = torch.cat([ref, ref])
        voice = None if voice is None else torch.cat([voice, voice])
    sig = flow_sigmas(steps, shift) + [0.0]
    video = audio_out = None
    made = 0                                              # frames sampled so far
    starts = windows(F, cfg.latent_frames, overlap)
    for k, start in enumerate(starts):
        n = min(F, cfg.latent_frames)
        held = made - start                               # frames of this window already made
        x = torch.randn((B, d.in_dim, n, ref.shape[3], ref.shape[4]), generator=g).to(dev, dt)
        xa = (torch.randn((B, n, d.audio_latent_tokens, d.audio_latent_dim), generator=g).to(dev, dt)
              if d.joint_audio else None)
        eps, eps_a = x[:, :, :held].clone(), None if xa is None else xa[:, :held].clone()
        txt = text[:, start:start + n] if text.dim() == 4 else text
        aud = None if audio is None else audio[:, start:start + before + n + after]
        if two:
            txt, aud = guided_conditions(txt, aud, guide)
        for s, s_next in zip(sig[:-1], sig[1:]):
            x2 = torch.cat([x, x]) if two else x
            xa2 = torch.cat([xa, xa]) if two and xa is not None else xa
            out = model(x2, torch.full((rows,), timestep(s), device=dev), txt, audio=aud, audio_latent=xa2, ref=ref,
                        **({} if voice is None else {"voice": voice}))
            v, va = out.video, out.audio
            if two:
                v, va = guided(v, guidance), guided(va, guidance)
            x = x + (s_next - s) * v.to(dt)
            if xa is not None:
                xa = xa + (s_next - s) * va.to(dt)
            if held:
                x[:, :, :held] = add_noise(video[:, :, start:made], eps, s_next)
                if xa is not None:
                    xa[:, :held] = add_noise(audio_out[:, start:made], eps_a, s_next)
        if video is None:
            video, audio_out = x.new_empty(x.shape[:2] + (F,) + x.shape[3:]), None
            if xa is not None:
                audio_out = xa.new_empty((B, F) + xa.shape[2:])
        video[:, :, start:start + n] = x
        if xa is not None:
            audio_out[:, start:start + n] = xa
        made = start + n
        if progress is not None:
            progress(k + 1, len(starts))
    return video, audio_out


def windows(frames: int, length: int, overlap: int) -> list[int]:
    """First latent frames of the windows `sample_bidirectional` covers `frames` frames with: `length`
    frames each, every one starting `overlap` frames before the previous ended, the last ending at the
    clip's end (so it may overlap more); one window when the clip is no longer than `length`."""
    if not 0 <= overlap < length:
        raise ValueError(f"a window of {length} latent frames takes an overlap of 0 to {length - 1}, not {overlap}")
    if frames <= length:
        return [0]
    starts = list(range(0, frames - length + 1, length - overlap))
    return starts if starts[-1] + length == frames else starts + [frames - length]


@torch.no_grad()
def sample_causal(model: DiT, cfg: ModelConfig, ref, text, audio=None, steps: int = CAUSAL_STEPS, shift: float = SHIFT,
                  seed: int = 0, chunk_frames: int = 1, guidance: float = TEACHER_GUIDANCE,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same inputs as `sample_bidirectional` (batch 1), generated chunk by chunk with the engine's
    Euler sampler, the window and sink stage 2 trains with (`sampling_record`), clean history."""
    from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
    F, ctx = cfg.latent_frames, sum(model.cfg.audio_context)
    rec = sampling_record(cfg, "causal", shift, chunk_frames, None, {})
    st = StreamSettings(chunk_frames=chunk_frames, steps=steps, shift=shift, window=rec["window"], sink=rec["sink"],
                        twin=False, sampler="euler", guidance=guidance)
    eng = StreamEngine(model, cfg, st, seed=seed)
    eng.start(ref)
    vs, aus = [], []
    for c in range(0, F - F % chunk_frames, chunk_frames):
        a = None if audio is None else audio[:, c:c + chunk_frames + ctx]    # the chunk's frames and speech context
        r = eng.step(ChunkInputs(text, a))
        vs.append(r.video)
        aus.append(r.audio)
    return torch.cat(vs, 2), (torch.cat(aus, 1) if aus[0] is not None else None)


def sampling_record(cfg: ModelConfig, stage: str, shift: float, chunk_frames: int, noisy_level: float | None,
                    codec: dict) -> dict:
    """What a checkpoint of `stage` trained on `cfg.latent_frames`-frame clips has seen, as streaming settings:

    - chunk_frames: the causal block size of training (the stream generates chunks of exactly this);
    - window, sink: the largest history the stream may keep so that ref + sink + window + chunk fits in
      the 1 + latent_frames positions stage 1 used; stage 2 trains with exactly this window and sink
      (stages/train/loop.py), so the stream sees the positions and context training saw;
    - noisy_level: the highest history noise level of diffusion forcing (None: clean history only), so
      a TwinCache's noisy cache is taken at the first step whose noise level is at most it;
    - shift, steps: the flow schedule the stream samples with; codec: the latent space of training;
    - sampler STREAM_SAMPLER, guidance STREAM_GUIDANCE on STREAM_GUIDE: how the checkpoint streams by
      default (chosen by measurement, above; `--sampler euler --guidance 2` gives the ODE teacher sampler); a checkpoint
      without these keys streams with StreamSettings' defaults.
    """
    F, cf = cfg.latent_frames, chunk_frames
    sink = F - 2 * cf >= cf                              # room for a sink chunk and one history chunk
    window = max(cf, (F - cf - (cf if sink else 0)) // cf * cf)
    steps = CAUSAL_STEPS if stage == "causal" else BIDIRECTIONAL_STEPS
    noisy = step_at_level(noisy_level, steps, shift)
    return {"stage": stage, "shift": shift, "steps": steps, "chunk_frames": cf, "window": window, "sink": sink,
            "twin": noisy is not None, "noisy_step": noisy or 0, "noisy_level": noisy_level, "codec": codec,
            "sampler": STREAM_SAMPLER, "guidance": STREAM_GUIDANCE, "guide": STREAM_GUIDE}


def whole_settings(record: dict | None, steps: int | None = None, guidance: float | None = None,
                   guide: str | None = None) -> dict:
    """How `sample_clips` samples a checkpoint: the steps, guidance and its target asked for, else the
    checkpoint's record (its shift always), else the bidirectional teacher's defaults."""
    rec = record or {}
    return {"steps": steps or BIDIRECTIONAL_STEPS, "shift": rec.get("shift", SHIFT),
            "guidance": rec.get("guidance", STREAM_GUIDANCE) if guidance is None else guidance,
            "guide": guide or rec.get("guide", STREAM_GUIDE)}


@torch.no_grad()
def sample_clips(model: DiT, cfg: ModelConfig, codec, encode_text, refs: list, waves: list, events: list,
                 frames: int, steps: int = BIDIRECTIONAL_STEPS, shift: float = SHIFT, guidance: float = STREAM_GUIDANCE,
                 guide: str = STREAM_GUIDE, seed: int = 0, overlap: int = OVERLAP, progress=None) -> list:
    """A bidirectional teacher's clips of any length, the way a stream is driven: reference images
    (HxWx3 uint8, encoded as a stream starts, models.encoders.reference_latent), speech (16 kHz waves)
    and timed instructions ((onset s, end s, text) each; the neutral prompt elsewhere) -> `frames`
    video frames [T, H, W, 3] uint8 per clip, sampled together (`sample_bidirectional`, in windows past
    the model's clip length) and decoded by `codec` (TAEHV) a piece at a time. Each latent frame reads
    the text in force when it is shown, as training's clips do (stages/samples.py); `encode_text`:
    list[str] -> [N, L, D] features; `progress`: sample_bidirectional's."""
    from models.audio import audio_features, check_wave_speech
    from models.config import NEUTRAL_TEXT
    from models.encoders import reference_latent
    from stages.samples import text_timeline
    from stages.train.data import fit_text
    check_wave_speech(cfg)
    d, per, fps = cfg.dit, cfg.audio.video_frames_per_latent, cfg.audio.fps
    dev = next(model.parameters()).device
    F = 1 + -(-(frames - 1) // per)                      # latent frames whose video covers `frames`
    texts, conds = {}, []
    for ev in events:
        line = text_timeline(NEUTRAL_TEXT, [tuple(e) for e in ev], 0.0, F, fps, per, base_onset=0.0)
        for x in line.texts:
            if x not in texts:
                texts[x] = fit_text(torch.as_tensor(encode_text([x])[0]).float().cpu(), d.text_len)
        conds.append(torch.stack([texts[x] for x in line.texts])[torch.tensor(line.index)])
    ref = torch.cat([reference_latent(codec, r, cfg.height, cfg.width) for r in refs]).float()
    speech = (torch.stack([audio_features(torch.as_tensor(w, dtype=torch.float32), F, cfg.audio, context=d.audio_context)
                           for w in waves]).to(dev) if d.audio_dim else None)
    dt = next(model.parameters()).dtype
    cast = dev.type == "cuda" and dt == torch.float32          # a float32 model on a GPU: bf16 autocast, as training
    with torch.autocast("cuda", torch.bfloat16, enabled=cast):
        z, _ = sample_bidirectional(model, cfg, ref.to(dev, dt), torch.stack(conds).to(dev, dt),
                                    None if speech is None else speech.to(dt), steps=steps, shift=shift, seed=seed,
                                    guidance=guidance, guide=guide, frames=F, overlap=overlap, progress=progress)
    return [decode_video(codec, z[j:j + 1], frames) for j in range(len(refs))]


def decode_video(codec, z: torch.Tensor, frames: int) -> np.ndarray:
    """One clip's video latent [1, C, F, h, w] -> its first `frames` frames [T, H, W, 3] uint8, decoded by
    `codec` (TAEHV) 16 latent frames at a time (hours of video fit)."""
    dec = codec.stream_decoder()
    x = torch.cat([dec.push(z[:, :, i:i + 16].permute(0, 2, 1, 3, 4).float()) for i in range(0, z.shape[2], 16)], 1)
    return (x[0, :frames].permute(0, 2, 3, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
