"""One loaded model per worker device, shared by all of its sessions, and the profiles a session can
run at: the model's own settings ("full"), then fewer denoising steps, then half the resolution as well.
Each profile's chunk time is measured at start at every batch size the worker may run (`calibrate`), never
guessed; live, the worker's own forwards are measured too (stages/serve/scheduler.py: Worker.measured).

A session's Parts are the shared model, decoder and text encoder with an engine of its own
(its caches, ring and noise); the Session of stages/stream/session.py drives it chunk by chunk.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.serve.metrics import log
from stages.serve.profile import Profile
from stages.stream.engine import StreamEngine, StreamSettings
from stages.stream.events import EventQueue, StreamError
from stages.stream.session import Parts, Session, SessionOptions, load_parts


class ServeModel:
    """The model of one worker device: `parts(rgb, profile, seed)` makes a session's Parts."""

    def __init__(self, ckpt: str | Path | None, preset: str = "tiny", device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, decoder_weights=None, text_encoder_path=None,
                 size: tuple[int, int] | None = None, compile: bool = False, kernels: bool | None = None,
                 attention: str = "sdpa"):
        """`size`: (width, height) of the full profile (default: the model's own); `compile`: the model's
        blocks compiled once for all sessions (the first chunk of each new batch shape waits for it);
        `kernels`, `attention`: its fast path (load_parts)."""
        self.device, self.seed = device, seed
        with tempfile.TemporaryDirectory() as d:        # load_parts reads its reference from a file: a grey one
            grey = Path(d) / "grey.png"
            from PIL import Image
            Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
            self.base = load_parts(grey, ckpt, preset, None, decoder_weights, text_encoder_path, device, dtype, seed,
                                   compile=compile, kernels=kernels, attention=attention)
        if size is not None:
            width, height = size
            step = self.size_step
            if width < step or height < step or width % step or height % step:
                raise StreamError(f"the size must be multiples of {step} px (the latent stride x the patch), "
                                  f"not {width}x{height}")
            self.base = dataclasses.replace(self.base, cfg=dataclasses.replace(self.base.cfg, height=height, width=width))
        self.grey = np.full((self.base.cfg.height, self.base.cfg.width, 3), 128, np.uint8)
        self.profiles = self._profiles()

    @property
    def size_step(self) -> int:
        """Frame sides are multiples of this: the latent stride x the patch."""
        return 8 * self.base.cfg.dit.patch_size[1]

    def _profiles(self) -> list[Profile]:
        cfg, st, trained = self.base.cfg, self.base.engine.st, self.base.trained
        step = self.size_step
        h, w = max(step, cfg.height // 2 // step * step), max(step, cfg.width // 2 // step * step)
        out = [Profile("full", st, cfg.height, cfg.width)]
        fewer = None
        if st.steps > 1:
            try:
                fewer = StreamSettings.resolve(cfg, trained, **_fewer_steps(st, trained))
            except StreamError:                          # the checkpoint never saw it: no such profile
                fewer = None
            if fewer is not None:
                out.append(Profile(f"steps{fewer.steps}", fewer, cfg.height, cfg.width))
        if (h, w) != (cfg.height, cfg.width):
            out.append(Profile(f"steps{(fewer or st).steps}-{w}x{h}", fewer or st, h, w))
        return out

    def fewer_steps(self, p: Profile) -> Profile | None:
        """The next profile with fewer steps at p's resolution whose caches are laid out as p's (a running
        session can switch to it between chunks), or None."""
        for q in self.profiles:
            if ((q.height, q.width) == (p.height, p.width) and q.settings.steps < p.settings.steps
                    and all(getattr(q.settings, f) == getattr(p.settings, f) for f in StreamEngine.FIXED)):
                return q
        return None

    def profile(self, name: str) -> Profile:
        return next(p for p in self.profiles if p.name == name)

    def parts(self, rgb: np.ndarray, profile: Profile, seed: int, voice: str | None = None) -> Parts:
        """A session's Parts: the shared model with its own engine at `profile`, started from `rgb` [H, W, 3] uint8
        (and, for a model with character voices, `voice`: stages.stream.session.speaking_voice)."""
        from models.encoders import reference_latent
        from stages.stream.session import speaking_voice
        b = self.base
        cfg = b.cfg if (profile.height, profile.width) == (b.cfg.height, b.cfg.width) else \
            dataclasses.replace(b.cfg, height=profile.height, width=profile.width)
        ref = reference_latent(b.decoder, rgb, cfg.height, cfg.width)   # [1, C, 1, h, w]
        engine = StreamEngine(b.engine.model, cfg, profile.settings, seed=seed, keep_text=True)
        index, said = speaking_voice(cfg, voice)
        engine.start(ref, index)
        base = speaking_voice(cfg, None)[1]              # the grey base's own voice note is not this session's
        return dataclasses.replace(b, engine=engine, cfg=cfg, notes=[n for n in b.notes if n not in base] + said)

    def calibrate(self, chunks: int, batch: int = 1, budget_s: float = math.inf) -> None:
        """Time each profile's steady batched chunk at every batch size 1..`batch` (Profile.batch_s: size ->
        the median of `chunks` timed forwards), as the worker runs them (stages/stream/batch.py's next_chunks).

        Per profile, `batch` grey-reference sessions first fill their rings together (slots + 1 forwards of
        all of them: the first chunk makes one frame, a filling window attends to less); then each size b
        runs sessions[:b]: one warm-up forward (the shape's first call: allocations, kernel and attention-plan
        choices, a compilation) and `chunks` timed ones. The sessions drift apart by chunk count as the sizes
        run (session 0 takes part in every one), so the batches stack contexts at different positions, as
        the live ones of sessions that arrived at different times do.

        Sizes 1 and `batch` are always timed, first; then 2, 3, ... while each one's forwards, at most
        (1 + chunks) x the time at `batch`, fit within the profile's share of `budget_s` (the
        calibration's total seconds, ServeOptions.calib_budget_s, split evenly over the profiles, a share
        left unused passing on to the next). A size not timed counts at the time of the next larger one
        (Worker.batch_time): a batch is never cheaper than a smaller one."""
        from stages.stream.batch import next_chunks
        fps = self.base.cfg.audio.fps
        chunks, batch = max(1, chunks), max(1, batch)
        start = time.perf_counter()

        def run(sessions: list) -> tuple[float, list]:
            t = time.perf_counter()
            outs = next_chunks(sessions)
            dt = time.perf_counter() - t
            if bad := next((o for o in outs if isinstance(o, BaseException)), None):
                raise bad
            return dt, outs

        for k, p in enumerate(self.profiles):
            sessions = [Session(self.parts(self.grey, p, self.seed + i), EventQueue(), live_options())
                        for i in range(batch)]
            for _ in range(p.settings.slots + 1):
                run(sessions)
            p.batch_s = {}
            share_end = start + budget_s * (k + 1) / len(self.profiles)
            skipped = []
            for size in sorted({1, batch}) + list(range(2, batch)):
                if size not in (1, batch) and \
                        time.perf_counter() + (1 + chunks) * p.batch_s[batch] > share_end:
                    skipped.append(size)
                    continue
                run(sessions[:size])                                  # the shape's first call: not timed
                times = []
                for _ in range(chunks):
                    dt, outs = run(sessions[:size])
                    times.append(dt)
                    p.video_s = outs[0][0].shape[0] / fps
                p.batch_s[size] = float(np.median(times))
            p.batch_s = dict(sorted(p.batch_s.items()))
            if skipped:
                log("calibration_budget", profile=p.name, budget_s=budget_s, not_timed=skipped)
            del sessions


def live_options(instruction: str | None = None) -> SessionOptions:
    """A served session: live audio (push-to-talk, never waited for), no end but the viewer's."""
    opts = SessionOptions(live_audio=True, audio_ends_stream=False, realtime=False)
    return dataclasses.replace(opts, instruction=instruction) if instruction else opts


def _fewer_steps(st: StreamSettings, trained: dict | None) -> dict:
    """The settings of one step fewer: with a checkpoint, resolve() places the noisy cache at the level
    it was trained with (or turns TwinCache off); without, the noisy step stays an intermediate one."""
    n = st.steps - 1
    if trained:
        return {"steps": n}
    keep = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
    twin = st.twin and n >= 2
    return {**keep, "steps": n, "twin": twin, "noisy_step": min(st.noisy_step, n - 2) if twin else 0}
