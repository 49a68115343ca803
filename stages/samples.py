"""The training-sample shard format: what `vidu embed` writes and `vidu train` reads.

A shard is a safetensors file <clip id>.NNN.safetensors holding several samples of one clip; a
samples manifest row points at its shard and key prefix p. Shards are written atomically. Keys:

    text                  [L, D] float32  the clip-level text (caption, else the neutral prompt)
    p/video               [T, H, W, 3] uint8 frames, or [C, F, h, w] float32 latents
    p/ref                 [C, 1, h, w] float32  the first frame's latent (latent kinds only)
    p/audio               [F, mel_per_latent, n_mels] float32  audio features per latent frame
    p/wave                [T * 16000 / fps] float32  16 kHz mono
    p/texts               [N, L', D] float32  the N distinct texts in force in the window, in order
                          of first use, zero-padded to the longest (the manifest's "texts" names them)
    p/text_index          [F] int64   the text in force at each latent frame (row into p/texts)
    p/text_onsets         [E] float64 seconds from the sample start at which the text of a latent
                          frame took force, one per change of text_index (the first one <= 0: the
                          text already in force when the window starts)
    p/text_onset_index    [E] int64   the text that took force at each onset

Per-chunk text (`text_timeline`): latent frame k covers video frames 4k-3 .. 4k (frame 0 alone,
models/audio.py) and takes the text in force when its first video frame, max(0, 4k-3), is shown
(max(0, 4k-3) / fps after the sample start). A text whose onset falls inside a latent frame, after
that moment, applies from the next latent frame: the first latent boundary at or after the onset,
where `vidu stream` and the eval bench apply an instruction (between chunks). A text shorter than
a latent frame can be seen by none. Real clips (`vidu caption`): the clip caption is the base
prompt, each speech chunk's caption is in force over [start, end) of its chunk. Synthetic clips
(`vidu synth`): the neutral prompt is the base, each timed instruction is in force from its onset
to the end of its action (`synth_events`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

TIME_EPS = 1e-6
TEXT_KEYS = ("texts", "text_index", "text_onsets", "text_onset_index")
Event = tuple[float, float, str]          # (onset s, end s, text) on the clip's timeline


def reference_time(start_s: float, end_s: float, t0: float, T: int, fps: float) -> float:
    """The time of a window's reference frame: a frame of the same clip (one shot of one subject) away
    from the window, the middle of the longer stretch of the clip before or after it; a clip of one window
    gives the window's last frame. Never the window's first frame, which is also the first frame to be
    predicted: a model given it learns to copy the reference's pose and expression (session 62's probe)."""
    before, after = t0 - start_s, end_s - (t0 + T / fps)
    if max(before, after) < 1 / fps - TIME_EPS:
        return t0 + (T - 1) / fps
    return start_s + before / 2 if before > after else t0 + T / fps + after / 2


def to_video(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [1, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


@dataclass(frozen=True)
class TextTimeline:
    """The texts in force per latent frame of one sample (see the module docstring for the rule)."""
    texts: list[str]            # [N] distinct, in order of first use
    index: list[int]            # [F] per latent frame, into texts
    onsets: list[float]         # [E] s from the sample start, one per change of index (the first <= 0)
    onset_index: list[int]      # [E] into texts

    def tensors(self, encode: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shard tensors (TEXT_KEYS); `encode(text)` gives one text's [L, D] features."""
        feats = [encode(t) for t in self.texts]
        L = max(f.shape[0] for f in feats)
        table = torch.stack([torch.cat([f, f.new_zeros(L - f.shape[0], f.shape[1])]) for f in feats]).float()
        return {"texts": table, "text_index": torch.tensor(self.index, dtype=torch.int64),
                "text_onsets": torch.tensor(self.onsets, dtype=torch.float64),
                "text_onset_index": torch.tensor(self.onset_index, dtype=torch.int64)}


def latent_frame_start(k: int, per: int = 4) -> int:
    """The first video frame of latent frame k (k covers per*k - per + 1 .. per*k; frame 0 alone)."""
    return max(0, per * k - per + 1)


def text_segments(base: str, base_onset: float, events: Sequence[Event]) -> list[tuple[float, str]]:
    """(onset, text) of each stretch of constant text from `base_onset` on, by onset: at any time the
    event (onset <= t < end) with the latest onset is in force, else `base`. O(events^2), once per clip."""
    def in_force(t: float) -> str:
        live = [(on, text) for on, end, text in events if on <= t + TIME_EPS and t + TIME_EPS < end]
        return max(live, key=lambda e: e[0])[1] if live else base

    points = sorted({base_onset} | {p for on, end, _ in events for p in (on, end) if p > base_onset})
    out: list[tuple[float, str]] = []
    for p in points:
        text = in_force(p)
        if not out or out[-1][1] != text:
            out.append((p, text))
    return out


def text_timeline(base: str, events: Sequence[Event], start: float, frames: int, fps: float, per: int = 4,
                  base_onset: float | None = None) -> TextTimeline:
    """The texts of the `frames` latent frames of a window starting at `start` (clip seconds):
    frame k takes the text in force at start + latent_frame_start(k) / fps. `base` is in force from
    `base_onset` (default `start`) wherever no event is."""
    return frame_texts(text_segments(base, start if base_onset is None else min(base_onset, start), events),
                       start, frames, fps, per)


def frame_texts(segments: list[tuple[float, str]], start: float, frames: int, fps: float, per: int = 4) -> TextTimeline:
    """`text_timeline` from a clip's `text_segments` (computed once per clip, read per window)."""
    import bisect
    if frames < 1:
        raise ValueError(f"a sample has at least one latent frame, got {frames}")
    onsets = [on for on, _ in segments]
    if start + TIME_EPS < onsets[0]:
        raise ValueError(f"the window starts at {start:.3f} s, before the first text's onset {onsets[0]:.3f} s")
    texts: list[str] = []
    index: list[int] = []
    ev_on: list[float] = []
    ev_ix: list[int] = []
    for k in range(frames):
        j = bisect.bisect_right(onsets, start + latent_frame_start(k, per) / fps + TIME_EPS) - 1
        text = segments[j][1]
        if text not in texts:
            texts.append(text)
        index.append(texts.index(text))
        if k == 0 or index[-1] != index[-2]:
            ev_on.append(onsets[j] - start)
            ev_ix.append(index[-1])
    return TextTimeline(texts, index, ev_on, ev_ix)


def chunk_events(chunk_captions: Sequence[dict] | None) -> list[Event]:
    """(start, end, text) of a captioned row's speech chunks (`vidu caption`; silence chunks leave
    the clip caption in force)."""
    return [(float(c["start"]), float(c["end"]), c["text"]) for c in chunk_captions or []
            if c.get("category") != "silence" and c.get("text")]


def synth_events(truth) -> tuple[list[Event], str]:
    """(onset, end, text) of a synthetic sample's timed instructions and where they came from: its
    "events" [(onset s, action start s, end s, text)] when the world gives them, else its "actions"
    [(start s, end s, text)] with onset = start. `truth`: a stages.synth Sample or its ground-truth
    dict (the .json sidecar of `vidu synth`)."""
    get = truth.get if isinstance(truth, dict) else lambda k: getattr(truth, k, None)
    if get("events") is not None:
        return [(float(on), float(end), str(text)) for on, _, end, text in get("events")], "events"
    return [(float(a), float(b), str(text)) for a, b, text in get("actions") or []], "actions"


def synth_timeline(sample, neutral: str, per: int = 4, start: float = 0.0, frames: int | None = None) -> TextTimeline:
    """A world Sample's texts per latent frame (the neutral prompt between instructions), at the
    sample's own fps: the structure `vidu embed` writes for a `vidu synth` clip."""
    T = len(sample.frames) if frames is None else frames
    events, _ = synth_events(sample)
    return text_timeline(neutral, events, start, 1 + (T - 1) // per, sample.fps, per, base_onset=0.0)


def shard_name(clip_id: str, index: int) -> str:
    """The file name of a clip's shard `index` (ids may hold any character: unsafe ones become _ plus a hash)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", clip_id)
    if safe != clip_id:
        safe += "-" + hashlib.blake2b(clip_id.encode(), digest_size=4).hexdigest()
    return f"{safe}.{index:03d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomic: a uniquely named temp file in the same folder, renamed over the target."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_sample(row: dict) -> dict[str, torch.Tensor]:
    """The tensors of one samples-manifest row: video, ref (latent kinds) or ref_frame (frames; absent
    from shards written before it), audio, wave, text (the clip-level text) and the per-frame texts
    (TEXT_KEYS; absent from shards written before them)."""
    from safetensors import safe_open
    path = Path(row["shard"])
    if not path.is_file():
        raise FileNotFoundError(f"shard of sample {row['id']} not found: {path}")
    p = row["key_prefix"]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        names = {"video": f"{p}/video", "ref": f"{p}/ref", "ref_frame": f"{p}/ref_frame", "audio": f"{p}/audio",
                 "wave": f"{p}/wave",
                 "text": "text", **{k: f"{p}/{k}" for k in TEXT_KEYS}}
        return {name: f.get_tensor(key) for name, key in names.items() if key in keys}
