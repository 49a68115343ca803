"""The student's self-rollout (Self-Forcing): it generates whole clips chunk by chunk through the
streaming engine itself (stages/stream/engine.py, `StreamEngine.advance`): the few-step x0-and-renoise
schedule, the sliding window, sink, RoPE repositioning and TwinCache of `vidu stream`, in the engine's
training mode: per chunk an exit step k (drawn once per chunk for the whole global batch, so the same
on every rank), the chunk is step k's x0 and carries the gradient of step k alone, and the history the
next chunks read is detached. With no exit steps and gradients off it is what `vidu stream` generates
(tests/test_distill.py). Under `StreamSettings.recache` (LongLive's training with recache) a row whose
text changes at a chunk has its history recached under the new text first, as `vidu stream` does at
an instruction switch; the other rows keep theirs.

    video, audio_latent = self_rollout(student, cfg, st, ref, text, speech, chunks, exits, seed)
"""
from __future__ import annotations

import torch

from models.config import ModelConfig
from models.dit import DiT
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from stages.train.objectives import Draw

STUDENT_STEPS = 3     # denoising steps per chunk of the distilled student


def student_settings(cfg: ModelConfig, record: dict | None, steps: int = STUDENT_STEPS,
                     recache: bool = False) -> StreamSettings:
    """How the student streams (and so rolls out in training): the teacher's record (window, sink,
    chunk size, shift, noisy level) at `steps` x0-and-renoise steps, unguided (one pass a step), with
    the history recached at instruction switches when `recache`."""
    return StreamSettings.resolve(cfg, record, steps=steps, sampler="renoise", guidance=1.0, recache=recache)


def exit_steps(draw: Draw, chunks: int, steps: int) -> list[int]:
    """One exit step per chunk, uniform over 0..steps-1, shared by every row and rank."""
    return [draw.randint(steps) for _ in range(chunks)]


def chunk_inputs(text: torch.Tensor, audio: torch.Tensor | None, j: int, cf: int, audio_context: int) -> ChunkInputs:
    """Chunk j's conditions from a clip's: text [B, L, D] (or per frame [B, F, L, D]: the chunk's first
    frame's), speech [B, before + F + after, K, A] -> the chunk's frames with their speech context."""
    t = text[:, j * cf] if text.ndim == 4 else text
    a = None if audio is None else audio[:, j * cf:(j + 1) * cf + audio_context]
    return ChunkInputs(t, a)


def self_rollout(model: DiT, cfg: ModelConfig, st: StreamSettings, ref: torch.Tensor, text: torch.Tensor,
                 audio: torch.Tensor | None, chunks: int, exits: list[int] | None = None, seed: int = 0,
                 rows: tuple[int, int] | None = None,
                 voice: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunks` chunks of batch B from a fresh engine seeded `seed`: (video [B, C, chunks * cf, h, w],
    joint audio latent [B, chunks * cf, Na, Ca] or None). `exits`: each chunk's exit step (None: all
    steps, what the engine streams). `rows` (lo, total): the B rows are rows lo.. of a rollout of `total`
    (a distillation rank's share, StreamEngine's). `voice` [B]: each row's character voice (a voice model's
    clips). Gradients follow the caller's grad mode."""
    if exits is not None and (len(exits) != chunks or not all(0 <= k < st.steps for k in exits)):
        raise ValueError(f"exits must be {chunks} steps in 0..{st.steps - 1}, not {exits}")
    eng = StreamEngine(model, cfg, st, batch=ref.shape[0], seed=seed, rows=rows)
    eng.start(ref, voice)
    ctx = sum(model.cfg.audio_context)
    vs, aus = [], []
    before = None
    for j in range(chunks):
        inputs = chunk_inputs(text, audio, j, st.chunk_frames, ctx)
        if st.recache and before is not None:
            switched = (inputs.text != before).flatten(1).any(1)
            if bool(switched.any()):
                eng.recache(inputs.text, switched)
        before = inputs.text
        r = eng.advance(inputs, None if exits is None else exits[j])
        vs.append(r.video)
        aus.append(r.audio)
    return torch.cat(vs, 2), (torch.cat(aus, 1) if aus[0] is not None else None)
