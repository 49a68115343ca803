"""The benchmark runner: every bench sample streamed through the same code as `vidu stream`
(stages/stream/session.py: the engine, TAEHV or the checkpoint's decoder, the audio FIFO, instruction
events read between chunks), written to a small mp4 (for `vidu eval --ab`), and scored with
stages/eval/video.py's `score_frames` plus, where the sample has synthetic ground truth, the numbers
of synthscore.py. One "eval" row per sample.

Systems: a checkpoint (`--ckpt`), the preset with random weights (no --ckpt: the pipeline check,
whose scores are honestly bad), or `oracle`: the sample's ground-truth video itself (synth renders,
hdtf clips, streambench samples with a "video"), the reference point every model is read against.

Timed instructions are typed the way a live user would: an event becomes an Instruction between
chunks, at the first chunk boundary at or after its onset, and the neutral prompt follows at its end.
Speed: fps and first-chunk latency from the session summary; per-chunk latency is the wall time
between consecutive chunks reaching the sinks (generate + decode + sink writes).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from stages.run import Stage, base_row, not_param

ORACLE = "oracle"


def system_name(ckpt: str | None, preset: str) -> str:
    if ckpt == ORACLE:
        return ORACLE
    return str(Path(ckpt).expanduser().resolve()) if ckpt else f"random:{preset}"


class _Collect:
    """A sink that keeps the frames and the audio that plays with them, and when each chunk arrived."""

    def __init__(self):
        self.frames, self.audio, self.arrivals = [], [], []

    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        self.arrivals.append(time.perf_counter())
        self.frames.append(frames)
        if audio is not None:
            self.audio.append(np.asarray(audio, np.float32).reshape(-1))

    def stats(self, stats: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Typist:
    """The session's per-chunk callback: puts each timed instruction on the queue once the frames
    generated so far reach its onset (so it applies from the next chunk), then the neutral prompt at
    its end."""

    def __init__(self, events, timed: list[tuple[float, float, str]], fps: float, neutral: str):
        from stages.stream.events import Instruction
        self.queue, self.Instruction = events, Instruction
        self.pending = sorted([(a, text) for a, _, text in timed] + [(b, neutral) for _, b, _ in timed])
        self.fps = fps

    def push_due(self, frames_done: int, put: bool = True) -> None:
        """Give the instructions due once `frames_done` frames exist (`put` False: drop them, as a resumed
        stream does with those given before its stop)."""
        while self.pending and self.pending[0][0] <= frames_done / self.fps + 1e-9:
            text = self.pending.pop(0)[1]
            if put:
                self.queue.put(self.Instruction(text))

    def __call__(self, stats: dict) -> None:
        self.push_due(stats["frames"])


def _percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"chunk_ms_p50": None, "chunk_ms_p90": None, "chunk_ms_p99": None}
    return {f"chunk_ms_p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


@dataclass
class EvalBench(Stage):
    """Stream and score one bench sample per item (items: ok rows of a bench_samples manifest)."""

    name: ClassVar[str] = "eval"
    kind: ClassVar[str] = "eval"
    version: ClassVar[str] = "1"
    reads: ClassVar[tuple[str, ...]] = ("image", "audio", "events", "video", "truth")
    writes: ClassVar[tuple[str, ...]] = ("video_path", "scores", "mouth_r", "instr_success", "chunk_ms")

    bench: str = "synth"
    system: str = "random:tiny"  # oracle | random:<preset> | a checkpoint path
    preset: str = "tiny"
    steps: int | None = None  # None: the checkpoint's (or the engine's default)
    chunk_frames: int | None = None
    window: int | None = None
    sampler: str | None = None  # None: the checkpoint's (StreamSettings.sampler)
    guidance: float | None = None  # None: the checkpoint's (StreamSettings.guidance)
    guide: str | None = None  # None: StreamSettings.guide's default (text and speech)
    recache: bool | None = None  # None: StreamSettings.recache's default (off)
    decoder_weights: str | None = None
    text_encoder_path: str | None = None
    seed: int = 0
    device: str = "cpu"
    compile: bool = False  # the model's blocks compiled (vidu stream --compile)
    kernels: bool | None = None  # the fused kernels (vidu stream --kernels; None: on a GPU)
    attention: str = "sdpa"  # self-attention's backend (vidu stream --attention)
    arcface: str | None = None
    judge: str | None = None  # local vision-language model judging instructions on real (non-synth) samples
    drift_segments: int = 4
    out_dir: str = not_param("")  # where the videos go (<workspace>/eval/<run id>)

    def setup(self) -> None:
        self._base = None  # model parts, loaded with the first sample

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("eval", id=item["id"], parent_id=item["id"], bench=self.bench, system=self.system,
                        sample_id=item["id"])

    # -- producing the frames --
    def _settings(self) -> dict:
        return {k: v for k, v in (("steps", self.steps), ("chunk_frames", self.chunk_frames), ("window", self.window),
                                  ("sampler", self.sampler), ("guidance", self.guidance), ("guide", self.guide),
                                  ("recache", self.recache))
                if v is not None}

    def _parts(self, image: str):
        """Model parts with a fresh engine started on this sample's reference; the model, decoder
        and text encoder load once per worker."""
        import torch
        from models.encoders import reference_latent
        from stages.stream.engine import StreamEngine
        from stages.sense.image import read_image
        from stages.stream.session import load_parts
        if self._base is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            ckpt = None if self.system.startswith("random:") else self.system
            self._base = load_parts(image, ckpt, self.preset, self._settings() or None, self.decoder_weights,
                                    self.text_encoder_path, self.device, dtype, self.seed, self.compile,
                                    self.kernels, self.attention)
        base = self._base
        cfg, eng = base.cfg, base.engine
        ref = reference_latent(base.decoder, read_image(image), cfg.height, cfg.width)  # [1, C, 1, h, w]
        engine = StreamEngine(eng.model, cfg, eng.st, seed=self.seed, keep_text=True)  # same noise for every sample
        engine.start(ref)
        return dataclasses.replace(base, engine=engine)

    def _stream(self, item: dict, wave: np.ndarray, video: Path) -> tuple[np.ndarray, np.ndarray, dict]:
        from models.config import NEUTRAL_TEXT
        from stages.stream.events import AudioChunk, AudioEnd, EventQueue
        from stages.stream.io import Mp4Sink
        from stages.stream.session import SessionOptions, run_session
        parts = self._parts(item["image"])
        if (parts.trained or {}).get("stage") == "bidirectional":
            return self._whole(parts, item, wave, video)
        fps = parts.cfg.audio.fps
        events = EventQueue()
        timed = [(float(a), float(b), str(t)) for a, b, t in json.loads(item["events"] or "[]")]
        typist = _Typist(events, timed, fps, NEUTRAL_TEXT)
        typist.push_due(0)  # instructions at 0 s apply to the first chunk
        events.put(AudioChunk(wave))
        events.put(AudioEnd())
        collect = _Collect()
        sinks = [collect, Mp4Sink(video, fps, parts.cfg.width, parts.cfg.height)]
        t0 = time.perf_counter()
        summary = run_session(parts, events, sinks, SessionOptions(), live=typist)
        if summary.get("reason") == "interrupted":
            raise KeyboardInterrupt
        frames = np.concatenate(collect.frames)
        audio = np.concatenate(collect.audio) if collect.audio else wave
        ms = list(1000 * np.diff([t0] + collect.arrivals))
        speed = {"stream_fps": summary.get("fps"), "first_frame_s": summary.get("first_chunk_s"), "chunk_ms": ms,
                 **_percentiles(ms)}
        return frames, audio, {"fps": float(fps), "speed": speed, "notes": list(parts.notes)}

    def _whole(self, parts, item: dict, wave: np.ndarray, video: Path) -> tuple[np.ndarray, np.ndarray, dict]:
        """A bidirectional teacher (stage 1) cannot stream: the sample is sampled whole, in overlapping
        windows of its clip length, with the texts in force at each frame and the speech
        (stages/train/sample.py `sample_clips`; steps, guidance and its target: the bench's, else the
        checkpoint's record), and written to the mp4 as a stream's frames are."""
        from stages.stream.io import Mp4Sink
        from stages.train.sample import sample_clips, whole_settings
        cfg = parts.cfg
        fps = cfg.audio.fps
        T = int(np.floor(len(wave) / 16000 * fps + 1e-6))          # the frames the speech spans
        timed = [(float(a), float(b), str(t)) for a, b, t in json.loads(item["events"] or "[]")]
        t0 = time.perf_counter()
        (frames,) = sample_clips(parts.engine.model, cfg, parts.decoder, parts.encode_text, [_read_rgb(item["image"])],
                                 [wave], [timed], T, **whole_settings(parts.trained, self.steps, self.guidance, self.guide),
                                 seed=self.seed)
        rate = T / (time.perf_counter() - t0)
        sink = Mp4Sink(video, fps, cfg.width, cfg.height)
        sink.write(frames, wave[: int(round(T / fps * 16000))])
        sink.close()
        return frames, wave, {"fps": float(fps), "speed": {},
                              "notes": [*parts.notes, f"a bidirectional teacher: sampled whole in windows of "
                                                      f"{cfg.latent_frames} latent frames, not streamed ({rate:.1f} frames/s)"]}

    def _oracle(self, item: dict, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """The ground-truth video on the 25 fps grid over the audio's span: the frame shown at
        each grid time (stages.sense.media.frames_at; any frame rate, start offset or variable rate)."""
        from stages.sense.media import frames_at
        seconds = len(wave) / 16000
        grid = np.arange(int(np.floor(seconds * 25 + 1e-6))) / 25
        frames, _ = frames_at(item["video"], grid, seconds)
        if len(frames) == 0:
            raise ValueError(f"{item['video']}: no decodable video frames")
        return frames, wave, {"fps": 25.0, "speed": {}, "notes": ["oracle: the ground-truth video"]}

    # -- one sample --
    def process(self, item: dict) -> list[dict]:
        from stages.eval.metrics import EvalError
        from stages.eval.video import EvalOptions, score_frames
        from stages.sense.media import load_audio
        row = self.error_row(item, "")
        if self.system == ORACLE and not item.get("video"):
            return [{**row, "status": "rejected", "reasons": ["no_ground_truth_video"]}]
        wave = load_audio(item["audio"], 16000)
        ref = _read_rgb(item["image"])
        if self.system == ORACLE:
            frames, audio, info = self._oracle(item, wave)
            video = item["video"]
        else:
            out = Path(self.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            video = out / f"{item['id']}.mp4"
            frames, audio, info = self._stream(item, wave, video)
        # synth ground truth is scored by synthscore at the case's size; other samples' instructions go
        # to score_frames (a --judge model, else not_assessed)
        events = None if item.get("truth") else [{"t": a, "text": text} for a, _, text in json.loads(item["events"] or "[]")]
        try:
            scores = score_frames(frames, info["fps"], audio[: int(round(len(frames) / info["fps"] * 16000))], ref,
                                  events or None, EvalOptions(arcface=self.arcface, judge=self.judge,
                                                              drift_segments=self.drift_segments, device=self.device))
        except EvalError as e:  # e.g. no face in the reference: the video scores stay null, said in notes
            scores = {}
            info["notes"].append(f"video scores not assessed: {e}")
        drift = scores.get("drift") or {}
        row.update(video_path=str(video), frames=int(len(frames)), seconds=len(frames) / info["fps"],
                   width=int(frames.shape[2]), height=int(frames.shape[1]),
                   scores=json.dumps(scores, default=_json_default), curves=json.dumps(drift.get("curves") or {}),
                   drift_identity=drift.get("identity"), drift_sharpness=drift.get("sharpness"),
                   drift_motion=drift.get("motion"), notes=info["notes"], **info["speed"])
        for k in ("identity", "identity_embedder", "sync_method", "sync_offset_frames", "sync_confidence",
                  "sync_distance", "sharpness", "flicker", "face_found"):
            v = scores.get(k)
            row[k] = v if not isinstance(v, str) or k in ("identity_embedder", "sync_method") else None
        if item.get("truth"):       # face_found from the world's analyzer (dlib's stays in `scores`)
            row.update(_synth_numbers(frames, info["fps"], item["truth"]))
        elif isinstance(scores.get("instructions"), dict):  # judged by a local model
            judged = scores["instructions"]
            row.update(instr_events=judged.get("events"), instr_success=judged.get("success_rate"))
        return [row]


def _synth_numbers(frames: np.ndarray, fps: float, truth_path: str, workers: int = 1) -> dict:
    from stages.eval.bench.synthscore import synth_scores
    truth = json.loads(Path(truth_path).read_text())
    if abs(fps - truth["fps"]) > 1e-6:
        raise ValueError(f"the system makes {fps:g} fps video; the ground truth is at {truth['fps']} fps")
    H, W = truth["height"], truth["width"]
    if frames.shape[1:3] != (H, W):  # analyze is calibrated at the case's size
        import cv2
        frames = np.stack([cv2.resize(f, (W, H), interpolation=cv2.INTER_LINEAR) for f in frames])
    s = synth_scores(frames, fps, truth, np.asarray(truth["control_mouth"], np.float64), workers)
    s["confusion"] = json.dumps(s["confusion"])
    s["instr_classes"] = json.dumps(s["instr_classes"])
    s["instr_blockers"] = json.dumps(s["instr_blockers"])
    s["drift_ratios"] = json.dumps(s["drift_ratios"])
    return s


def _read_rgb(path: str) -> np.ndarray:
    from stages.sense.image import read_image
    return read_image(path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
