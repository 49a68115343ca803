"""`vidu embed`: kept clips -> training samples (frames or video latents, audio features, text
features) in safetensors shards, one "samples" manifest row per sample.

    vidu caption ... | vidu embed --preset tiny
    vidu embed --from captioned.parquet --preset wan2.1-1.3b --vae Wan2.1_VAE.pth --text-model umt5-xxl/

Method, per clip row (any kind of the curation chain; the source video is decoded from
`video_path` between the clip's `start_s` and `end_s`):
- Windows: consecutive, non-overlapping windows of T = cfg.video_frames (1 + 4k) frames at the
  model's fps from the clip start; a clip shorter than one window is a rejected `too_short` row.
- Frames: the frame shown at each grid time t0 + k / fps (the last source frame with pts <= t),
  so a slower source repeats frames (counted in `repeated_frames`) and a faster one drops some.
  Each is cropped to the largest window of the model's aspect ratio that fits the frame, shrunk by
  `zoom`, centred on the row's `face_box` (the filter stage's median face box) or on the frame
  centre, clamped inside the frame, in whole pixels; then resized with PIL bicubic (antialiased).
- Video: the frames themselves (latent_kind "frames"; training codes them with its PCA codec), or
  latents from the Wan2.1 VAE (`vae`, normalised mu [C, F, h, w]) or TAEHV (`taehv`, [C, F, h, w]),
  plus the latent of the reference frame alone ("ref"; with frames, the frame itself, "ref_frame"): a frame
  of the same clip away from the window (`reference_time`: the middle of the clip's longer stretch before
  or after it, the window's last frame when the clip is one window; the row's `ref_s`), never the
  window's first frame, which a model would learn to copy.
- A/V lag: a row with `av_shift_s` (`vidu diarize --fix-av-offset`: the sound of the frame at t is
  heard at t + av_shift_s) has its audio read from t + av_shift_s for the frames at t (window and
  clip end shifted alike; silence before the file's start), so its samples are in sync.
- Audio: the window's 16 kHz mono samples ("wave", T * 16000 / fps of them) and their log-mel
  conditioning features per latent frame with the preset's speech context (DiTConfig.audio_context
  frames before and after: silence before the window as at a stream's start, the clip's own
  continuation after it; models.audio.audio_features, the training and streaming definition).
- Text: the row's `caption` (else the neutral prompt models.config.NEUTRAL_TEXT, recorded as
  text_source "neutral") through MiniLM or umT5 (local directory), [L, D] with L <= text_len.
- Per-chunk text with onsets (stages/samples.py `text_timeline`): per latent frame, the text in
  force when its first video frame is shown: the clip-level text as the base prompt and each speech
  chunk's caption (`chunk_captions` of `vidu caption`) over its chunk; a text whose onset falls
  inside a latent frame applies from the next one. Distinct texts are encoded once per clip.
- `vidu synth` rows: the mp4 at `path` from 0 to `duration_s`; the base prompt is the neutral one
  and each timed instruction of the ground truth (`gt_path`: "events", else "actions") is in force
  from its onset to its action's end; the clip-level text is the instruction in force for most of
  the clip (text_source "instruction"), else the neutral prompt, as training on the world does.

Storage: <out>/<clip id>.NNN.safetensors, the clip's windows in as few shards as keep each under
SHARD_BYTES of frames (the memory a worker holds), each written to a temp file and renamed; keys
"<clip id>_sNNN/{video,ref or ref_frame,audio,wave,texts,text_index,text_onsets,text_onset_index}" per sample
and "text" (the clip's text features) per shard (stages/samples.py gives shapes and meaning).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from models.audio import check_wave_speech
from models.config import NEUTRAL_TEXT, PRESETS, ModelConfig, preset as get_preset
from stages.run import Stage, base_row, not_param, ranged
from stages.samples import (TIME_EPS, TextTimeline, chunk_events, frame_texts, reference_time, shard_name,
                            synth_events, text_segments, text_timeline, to_video, write_shard)

SHARD_BYTES = 256 * 2**20       # frames per shard file at most (windows of one clip share a shard up to this)


def sample_config(preset: str, height: int | None = None, width: int | None = None, frames: int | None = None,
                  fps: int | None = None) -> ModelConfig:
    """The preset with the geometry overrides applied; checks they fit the model (T = 1 + 4k, 16 | H, W)."""
    cfg = get_preset(preset)
    check_wave_speech(cfg)                     # real clips' speech is a wave: log-mel or wav2vec2 features
    per = cfg.audio.video_frames_per_latent
    if frames is not None and (frames < 1 or (frames - 1) % per):
        raise ValueError(f"--frames must be 1 + {per}k (e.g. 17, 33, 81), got {frames}")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v < 16 or v % 16):
            raise ValueError(f"--{name} must be a positive multiple of 16, got {v}")
    if fps is not None and (fps <= 0 or fps != int(fps)):
        raise ValueError(f"--fps must be a positive whole number (the audio hop is 16000 / (4 fps)), got {fps}")
    audio = cfg.audio if fps is None else dataclasses.replace(cfg.audio, fps=int(fps))
    return cfg.replace(height=height or cfg.height, width=width or cfg.width, audio=audio,
                       latent_frames=cfg.latent_frames if frames is None else 1 + (frames - 1) // per)


def crop_window(W: int, H: int, out_w: int, out_h: int, face_box: list[float] | None = None,
                zoom: float = 1.0) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] in whole source pixels: the largest out_w:out_h window inside W x H, shrunk by
    `zoom`, centred on the normalised face box's centre (else the frame's), clamped inside the frame."""
    s = min(W / out_w, H / out_h) / zoom
    cw, ch = min(W, max(1, round(out_w * s))), min(H, max(1, round(out_h * s)))
    if face_box:
        cx, cy = (face_box[0] + face_box[2]) / 2 * W, (face_box[1] + face_box[3]) / 2 * H
    else:
        cx, cy = W / 2, H / 2
    x0 = min(max(math.floor(cx - cw / 2 + 0.5), 0), W - cw)                       # half-pixel rounds up
    y0 = min(max(math.floor(cy - ch / 2 + 0.5), 0), H - ch)
    return x0, y0, x0 + cw, y0 + ch


def crop_resize(rgb: np.ndarray, box: tuple[int, int, int, int], out_w: int, out_h: int) -> np.ndarray:
    """[H, W, 3] uint8 -> the box resized to [out_h, out_w, 3] uint8 (PIL bicubic, antialiased)."""
    from PIL import Image
    x0, y0, x1, y1 = box
    im = Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
    return np.asarray(im.resize((out_w, out_h), Image.BICUBIC))


def window_starts(start_s: float, end_s: float, T: int, fps: float, max_windows: int = 0) -> list[float]:
    """Start times of the consecutive T-frame windows that fit in [start_s, end_s)."""
    n = math.floor((end_s - start_s) * fps + TIME_EPS) // T
    if max_windows:
        n = min(n, max_windows)
    return [start_s + i * T / fps for i in range(n)]


def decode_grid(path: str, grid: list[float], end_s: float, box_for, out_w: int, out_h: int):
    """The frame shown at each grid time (stages.sense.media.frames_at, vidu's one frame-sampling
    convention), cropped and resized.

    `box_for(W, H)` gives the crop box once the frame size is known. Returns (frames [N, out_h,
    out_w, 3] uint8, presentation time (s) of the source frame shown at each grid time [N]: equal
    entries are a repeated frame, the source's mean fps between the first and last frame shown, the
    crop box)."""
    from stages.sense.media import frames_at
    box = None

    def convert(frame) -> np.ndarray:
        nonlocal box
        rgb = frame.to_ndarray(format="rgb24")
        box = box or box_for(rgb.shape[1], rgb.shape[0])
        return crop_resize(rgb, box, out_w, out_h)

    frames, shown = frames_at(path, grid, end_s, convert=convert)
    if len(frames) < len(grid):
        raise ValueError(f"no video frames in {path} from {grid[0]:.3f} s to {end_s:.3f} s")
    return frames, shown, mean_fps(path, shown[0], shown[-1]), box


def mean_fps(path: str, t0: float, t1: float) -> float:
    """The source's mean frame rate over the frames starting in [t0, t1] (0 for fewer than two)."""
    from stages.sense.media import SHOWN_EPS, video_index
    ix = video_index(path)
    t = ix.pts * float(ix.time_base)
    t = t[(t >= t0 - SHOWN_EPS) & (t <= t1 + SHOWN_EPS)]
    return float((len(t) - 1) / (t[-1] - t[0])) if len(t) > 1 and t[-1] > t[0] else 0.0


def clip_item(item: dict) -> dict:
    """A chain row as is; a `vidu synth` row as a clip from 0 to its duration (video_path = path), with
    its timed instructions under "synth_events" (from the ground-truth sidecar, else the row's actions)."""
    if item.get("video_path") is not None:
        for c in ("start_s", "end_s"):
            if item.get(c) is None:
                raise ValueError(f"row {item['id']} has no {c}")
        return item
    if item.get("path") is None or item.get("duration_s") is None:
        raise ValueError(f"row {item['id']} is neither a clip (video_path, start_s, end_s) nor a vidu synth "
                         f"sample (path, duration_s)")
    truth = {"actions": json.loads(item["actions"]) if item.get("actions") else []}
    if item.get("gt_path") and Path(item["gt_path"]).is_file():
        truth = json.loads(Path(item["gt_path"]).read_text())
    events, source = synth_events(truth)
    return {**item, "video_path": item["path"], "start_s": 0.0, "end_s": float(item["duration_s"]),
            "caption": None, "synth_events": events, "synth_events_source": source}


def clip_texts(item: dict, fps: float) -> tuple[str, str, list, str | None]:
    """(clip-level text, its source, timed events (onset, end, text), their source) of a clip row."""
    if "synth_events" in item:
        events = item["synth_events"]
        n = max(1, math.floor((item["end_s"] - item["start_s"]) * fps + TIME_EPS))   # video frames
        per_frame = text_timeline("", events, item["start_s"], n, fps, per=1)
        counts = {t: per_frame.index.count(j) for j, t in enumerate(per_frame.texts) if t}
        if not counts:
            return NEUTRAL_TEXT, "neutral", events, item["synth_events_source"]
        return max(counts, key=counts.get), "instruction", events, item["synth_events_source"]   # ties: first
    base, source = (item["caption"], "caption") if item.get("caption") else (NEUTRAL_TEXT, "neutral")
    chunks = item.get("chunk_captions")
    return base, source, chunk_events(chunks), "chunk_captions" if chunks else None


def speech_in(segments: list[dict] | None, a: float, b: float) -> float | None:
    if segments is None:
        return None
    return sum(max(0.0, min(s["end"], b) - max(s["start"], a)) for s in segments)


@dataclass
class Embed(Stage):
    name: ClassVar[str] = "embed"
    kind: ClassVar[str] = "samples"
    version: ClassVar[str] = "4"
    # clip kinds: video_path, start_s, end_s (+ speech_segments, face_box, caption, caption_source,
    # chunk_captions, av_shift_s when the input carries them); synth: path, duration_s, actions, gt_path (clip_item)
    reads: ClassVar[tuple[str, ...]] = ("id",)
    writes: ClassVar[tuple[str, ...]] = tuple((
        "clip_id video_path sample_index start_s end_s preset frames height width fps source_fps repeated_frames "
        "crop_box crop_center speech_coverage latent_kind latent_shape audio_shape wave_samples text_encoder "
        "text_shape text text_source caption_source shard key_prefix texts texts_shape texts_source text_index "
        "text_onsets text_onset_index").split())

    out: str = ""                      # shard folder (absolute)
    preset: str = ranged("tiny", choices=tuple(PRESETS))
    height: int | None = ranged(None, min=16)
    width: int | None = ranged(None, min=16)
    frames: int | None = ranged(None, min=1)
    fps: int | None = ranged(None, min=1)
    zoom: float = ranged(1.0, min=1)   # > 1 crops tighter around the subject
    vae: str | None = None             # Wan2.1 VAE weights (.pth / .safetensors)
    taehv: str | None = None           # taew2_1.pth
    text_encoder: str | None = ranged(None, choices=("minilm", "umt5"))  # default: the preset's
    text_model: str | None = None      # local model directory (umt5; minilm: its package by default)
    max_windows: int = ranged(0, min=0)  # per clip, 0 = all that fit
    device: str = not_param("cpu")

    def __post_init__(self):
        if not self.out:
            raise ValueError("the embed stage needs an output folder (out)")
        if self.vae and self.taehv:
            raise ValueError("give --vae or --taehv, not both")
        for flag, path in (("--vae", self.vae), ("--taehv", self.taehv)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} weights not found: {path}")
        if self.text_encoder not in (None, "minilm", "umt5"):
            raise ValueError(f"unknown text encoder {self.text_encoder!r}; choose minilm or umt5")
        if self.max_windows < 0:
            raise ValueError(f"--max-windows must be >= 0, got {self.max_windows}")
        if self.zoom < 1.0:
            raise ValueError(f"--zoom must be >= 1 (1 = the largest crop), got {self.zoom}")
        self.cfg = sample_config(self.preset, self.height, self.width, self.frames, self.fps)
        self.text_kind = self.text_encoder or self.cfg.text_encoder
        if self.text_kind == "umt5" and not self.text_model:
            raise FileNotFoundError(f"the umT5 text encoder (preset {self.preset}) needs a local model directory: "
                                    f"--text-model PATH (nothing is downloaded), or --text-encoder minilm")

    @property
    def latent_kind(self) -> str:
        return "wan_vae" if self.vae else "taehv" if self.taehv else "frames"

    def setup(self) -> None:
        from models.checkpoint import load_taehv, load_vae
        from models.encoders import TextEncoder
        self._text = TextEncoder(self.text_kind, self.text_model, max_len=self.cfg.dit.text_len, device=self.device)
        self._vae = load_vae(self.vae, self.cfg.vae, self.device) if self.vae else None
        self._taehv = load_taehv(self.taehv, self.device) if self.taehv else None

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("samples", id=item["id"], parent_id=item["id"], clip_id=item["id"],
                        video_path=item.get("video_path") or item.get("path"), preset=self.cfg.name)

    def process(self, item: dict) -> list[dict]:
        from stages.sense.media import load_audio
        cfg = self.cfg
        T, fps = cfg.video_frames, cfg.audio.fps
        item = clip_item(item)
        starts = window_starts(item["start_s"], item["end_s"], T, fps, self.max_windows)
        if not starts:
            row = self.error_row(item, "")
            row.update(status="rejected", reasons=["too_short"])
            return [row]
        text, text_source, events, events_source = clip_texts(item, fps)
        base = text if text_source == "caption" else NEUTRAL_TEXT
        feats: dict[str, torch.Tensor] = {}

        def encode(t: str) -> torch.Tensor:                       # [L, D], once per distinct text of the clip
            if t not in feats:
                feats[t] = self._text([t])[0].cpu()
            return feats[t]

        segments = text_segments(base, item["start_s"], events)
        timelines = [frame_texts(segments, t0, cfg.latent_frames, fps, cfg.audio.video_frames_per_latent)
                     for t0 in starts]
        audio = load_audio(item["video_path"], cfg.audio.sample_rate)
        per_shard = max(1, SHARD_BYTES // (T * cfg.height * cfg.width * 3))
        info = dict(text=text, text_source=text_source, texts_source=events_source)
        rows = []
        for k in range(0, len(starts), per_shard):
            group = list(enumerate(starts))[k:k + per_shard]
            rows += self._shard(item, group, [timelines[i] for i, _ in group], audio, encode, info,
                                Path(self.out) / shard_name(item["id"], k // per_shard))
        return rows

    def _shard(self, item: dict, group: list[tuple[int, float]], timelines: list[TextTimeline], audio: np.ndarray,
               encode, text: dict, path: Path) -> list[dict]:
        """Windows (index, start) of one clip -> their rows; tensors written to one shard at `path`."""
        cfg = self.cfg
        T, fps = cfg.video_frames, cfg.audio.fps
        face = item.get("face_box")
        grid = [t0 + j / fps for _, t0 in group for j in range(T)]
        refs = [reference_time(item["start_s"], item["end_s"], t0, T, fps) for _, t0 in group]
        every = np.array(grid + refs)
        order = np.argsort(every, kind="stable")          # one decoding pass: frames_at takes times in order
        shown, picked, source_fps, box = decode_grid(
            item["video_path"], every[order].tolist(), item["end_s"],
            lambda W, H: crop_window(W, H, cfg.width, cfg.height, face, self.zoom), cfg.width, cfg.height)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        frames, picked, ref_frames = shown[back[:len(grid)]], picked[back[:len(grid)]], shown[back[len(grid):]]
        text_feats = encode(text["text"])
        tensors = {"text": text_feats}
        rows = []
        for n, ((i, t0), timeline) in enumerate(zip(group, timelines)):
            prefix = f"{item['id']}_s{i:03d}"
            sl = slice(n * T, (n + 1) * T)
            sample = self._sample(frames[sl], ref_frames[n], audio, t0, item["end_s"],
                                  float(item.get("av_shift_s") or 0.0))
            sample.update(timeline.tensors(encode))
            tensors.update({f"{prefix}/{k}": v for k, v in sample.items()})
            t1 = t0 + T / fps
            speech = speech_in(item.get("speech_segments"), t0, t1)
            rows.append(base_row(
                "samples", id=prefix, parent_id=item["id"], clip_id=item["id"], video_path=item["video_path"],
                sample_index=i, start_s=t0, end_s=t1, ref_s=refs[n], preset=cfg.name, frames=T, height=cfg.height,
                width=cfg.width, fps=float(fps), source_fps=source_fps,
                repeated_frames=int(np.sum(picked[sl][1:] == picked[sl][:-1])), crop_box=[float(x) for x in box],
                crop_center="face" if face else "frame",
                speech_coverage=None if speech is None else speech / (t1 - t0), latent_kind=self.latent_kind,
                latent_shape=list(sample["video"].shape), audio_shape=list(sample["audio"].shape),
                wave_samples=int(sample["wave"].shape[0]), text_encoder=self._text_name(),
                text_shape=list(text_feats.shape), caption_source=item.get("caption_source"), shard=str(path),
                key_prefix=prefix, texts=timeline.texts, texts_shape=list(sample["texts"].shape),
                text_index=timeline.index, text_onsets=timeline.onsets, text_onset_index=timeline.onset_index,
                **text))
        write_shard(path, tensors, {"format": "vidu-samples", "clip_id": item["id"], "preset": cfg.name,
                                    "samples": [r["id"] for r in rows]})
        return rows

    def _text_name(self) -> str:
        return "minilm" if self.text_kind == "minilm" and not self.text_model else f"{self.text_kind}:{self.text_model}"

    @torch.no_grad()
    def _sample(self, frames: np.ndarray, ref: np.ndarray, audio: np.ndarray, t0: float, end_s: float,
                shift: float = 0.0) -> dict[str, torch.Tensor]:
        """One window's tensors: video [T, H, W, 3] uint8 with its reference frame `ref` [H, W, 3]
        ("ref_frame"), or latents [C, F, h, w] with the reference's (ref [C, 1, h, w]),
        audio [before + F + after, mel_per_latent, n_mels] (the preset's speech context: silence before
        the window, as at a stream's start; the clip's continuation after it, up to `end_s`),
        wave [T * sr / fps]. The audio is read `shift` s later than the frames (diarize's av_shift_s:
        the sound of the frame at t is at t + shift), the clip's audio end moving with it; before the
        file's start it is silence."""
        from models.audio import audio_features
        cfg, acfg = self.cfg, self.cfg.audio
        context = cfg.dit.audio_context
        n = int(cfg.video_frames * acfg.sample_rate // acfg.fps)
        a = int(round((t0 + shift) * acfg.sample_rate))
        more = context[1] * acfg.samples_per_latent + acfg.n_fft          # what the after-context can reach
        ahead = np.zeros(n + more, np.float32)
        lo, hi = max(a, 0), min(a + n + more, int(round((end_s + shift) * acfg.sample_rate)))
        piece = audio[lo:max(lo, hi)]
        ahead[lo - a: lo - a + len(piece)] = piece
        wave_t = torch.from_numpy(ahead[:n].copy())
        feats = audio_features(torch.from_numpy(ahead), cfg.latent_frames, acfg, context=context)
        out = {"wave": wave_t, "audio": feats.float()}
        if self._vae is not None:
            dev = next(self._vae.parameters()).device
            out["video"] = self._vae.encode(to_video(frames).to(dev))[0].float().cpu()
            out["ref"] = self._vae.encode(to_video(ref[None]).to(dev))[0].float().cpu()
        elif self._taehv is not None:
            dev = next(self._taehv.parameters()).device
            x = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float().div(255).to(dev)   # [1, T, 3, H, W]
            out["video"] = self._taehv.encode_video(x)[0].permute(1, 0, 2, 3).float().cpu()
            r = torch.from_numpy(ref[None]).permute(0, 3, 1, 2)[None].float().div(255).to(dev)
            out["ref"] = self._taehv.encode_video(r)[0].permute(1, 0, 2, 3).float().cpu()
        else:
            out["video"] = torch.from_numpy(np.ascontiguousarray(frames))
            out["ref_frame"] = torch.from_numpy(np.ascontiguousarray(ref))
        if self.latent_kind != "frames" and tuple(out["video"].shape) != cfg.latent_shape():
            raise ValueError(f"the {self.latent_kind} latent has shape {list(out['video'].shape)}; "
                             f"the model takes {list(cfg.latent_shape())}")
        return out


def default_out(root: Path, params: dict) -> Path:
    """<workspace>/samples/embed-<hash of the stage parameters other than out>."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return root / "samples" / f"embed-{key}"
