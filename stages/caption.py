"""`vidu caption`: a structured caption per clip and one caption per speech chunk, from measurements.

Two strictly separated paths fill the typed `cap_*` columns and the numbers behind them:

- visual, from frames only: `frames` frames sampled evenly over the clip give `brightness` (mean
  Rec.601 luma in [0, 1]), `contrast` (RMS luma contrast, std in [0, 1]) and `colorfulness`
  (Hasler & Suesstrunk 2003, on 0-255 RGB). The filter stage's numbers, when the row has them,
  are turned into words by the thresholds below (subject count, face size and position, camera and
  subject motion). With `vlm` (a local transformers vision-language model directory, e.g.
  Qwen2.5-VL) `vlm_frames` of those frames are shown to the model, which is asked for one JSON
  object of visual fields (subject appearance, action, motion, emotion, scene, camera, lighting,
  on-screen text); its raw answer is kept in `vlm_answer`. Parsed fields replace the measured
  words for motion, camera and lighting (the numbers stay); an unparsable answer fills nothing.
- acoustic, from the 16 kHz mono audio only: `loudness_lufs` is ITU-R BS.1770-4 integrated
  loudness (K-weighting, 400 ms blocks, -70 LUFS absolute and -10 LU relative gates) computed on
  the 16 kHz mono mix, so content above 8 kHz is not counted (the K-weighting is designed for the
  sample rate: a 997 Hz sine reads 0.04 dB above the 48 kHz filter's -3.01 LUFS at full scale); `noise_floor_dbfs` is the 10th
  percentile of 32 ms RMS levels; `snr_db` is the median speech-frame level minus that floor;
  `speech_rate` is syllable nuclei per second of speech (peaks of the 300-3000 Hz intensity
  envelope at least `NUCLEUS_PROMINENCE_DB` above their surroundings, at most one per 100 ms, in
  the speech intervals), or words per second of speech when `asr` (a local Whisper-family
  directory) transcribed it; `speech_rate_unit` says which. `music_score` is the share of
  non-speech time that is loud (> `MUSIC_MIN_DBFS`) and tonal (spectral flatness < 0.1 and
  normalised autocorrelation peak > 0.3 at a 2.5-20 ms lag): music under continuous speech is not
  seen, and with under `MIN_NONSPEECH_S` seconds without speech it is null (not measurable).

Chunks: one per kept diarized speech turn (`speech_turns`, source-video seconds) and one per
stretch of at least `min_gap` seconds between them ("silence"); a row without `speech_turns`
falls back to the clip's silero-vad `speech_segments` (category "speech", no speaker).
`chunk_source` says which. With `asr` each speech chunk is transcribed on its own audio.

Without models nothing is invented: appearance, action, emotion, scene and on-screen-text columns
stay null and `caption_source` is "measured"; with models it names them.

Run: vidu clip ... | vidu filter | vidu diarize | vidu caption [--vlm DIR] [--asr DIR]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from scipy import signal

from models.hf import VisionLanguageModel, as_label, first_json_object, load, model_dir
from manifests.schemas import CAPTION_COLUMNS
from stages.sense.media import clip_audio, clip_frames
from stages.run import Stage, base_row, ranged

SR = 16000
FRAME = 512  # 32 ms analysis frames at 16 kHz
HOP = 256
NUCLEUS_PROMINENCE_DB = 3.0
MUSIC_MIN_DBFS = -45.0
MIN_NONSPEECH_S = 0.5
WHISPER_WINDOW_S = 30.0

# words for measured numbers: (upper bound, word), first bound the value is below wins
FACE_AREA_WORDS = ((0.02, "wide shot"), (0.10, "medium shot"), (np.inf, "close-up"))  # face box / frame area
CAMERA_WORDS = ((0.01, "static camera"), (0.05, "slight camera movement"), (0.10, "moving camera"),
                (np.inf, "fast camera movement"))  # frame widths per second
SUBJECT_MOTION_WORDS = ((0.005, "nearly still"), (0.02, "small movements"), (0.05, "moderate movement"),
                        (np.inf, "large movement"))  # mean |luma difference| in the subject box
BRIGHTNESS_WORDS = ((0.2, "dark"), (0.35, "dim"), (0.67, "evenly exposed"), (np.inf, "bright"))
CONTRAST_WORDS = ((0.12, "low contrast"), (0.25, "medium contrast"), (np.inf, "high contrast"))
COLOR_WORDS = ((5.0, "black-and-white"), (33.0, "muted colours"), (59.0, "moderately colourful"),
               (np.inf, "colourful"))
MUSIC_WORDS = ((0.2, "no music detected outside speech"), (0.5, "some tonal sound outside speech"),
               (np.inf, "music (sustained tonal sound) present"))
NOISE_WORDS = ((-90.0, "digital silence between sounds"), (-60.0, "quiet background"),
               (-45.0, "audible background noise"), (np.inf, "loud background"))  # noise floor, dBFS

VISUAL_KEYS = ("subject", "action", "motion", "emotion", "scene", "camera", "lighting", "onscreen_text")
VLM_PROMPT = ("These are frames sampled in order from one video clip. Answer with only one JSON object with these "
              "string keys: subject (appearance of the main person: apparent age range, clothing, hair), action, "
              "motion, emotion (facial expression), scene (place and background), camera (shot size, angle, "
              "movement), lighting, onscreen_text (visible text, or \"none\"). Describe only what is visible.")


def words(value: float, table: tuple[tuple[float, str], ...]) -> str:
    return next(w for bound, w in table if value < bound)


# ---------------------------------------------------------------------------------------------
# acoustic measures (16 kHz mono float32)

def k_weighting(sr: int) -> np.ndarray:
    """BS.1770 K-weighting as two SOS rows (high shelf, then high pass) from the analog design
    parameters, bilinear with pre-warping (K = tan(pi fc / sr)); at 48 kHz these are the standard's
    published coefficients (after De Man's derivation, as pyloudnorm)."""
    rows = []
    for fc, q, gain_db in ((1681.974450955533, 0.7071752369554196, 3.999843853973347),
                           (38.13547087602444, 0.5003270373238773, None)):
        k = np.tan(np.pi * fc / sr)
        a0 = 1 + k / q + k * k
        den = [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
        if gain_db is None:
            num = [1.0, -2.0, 1.0]
        else:
            vh = 10 ** (gain_db / 20)
            vb = vh ** 0.4996667741545416
            num = [(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0]
        rows.append(num + den)
    return np.array(rows)


def loudness_lufs(x: np.ndarray, sr: int = SR) -> float | None:
    """BS.1770-4 gated integrated loudness of a mono signal; None when shorter than one 400 ms
    block or when no block passes the -70 LUFS gate (silence)."""
    block, step = int(0.4 * sr), int(0.1 * sr)
    if len(x) < block:
        return None
    y2 = signal.sosfilt(k_weighting(sr), x.astype(np.float64)) ** 2
    c = np.concatenate([[0.0], np.cumsum(y2)])
    starts = np.arange(0, len(x) - block + 1, step)
    z = (c[starts + block] - c[starts]) / block  # mean square per block
    lk = -0.691 + 10 * np.log10(z + 1e-20)
    z = z[lk > -70.0]
    if not len(z):
        return None
    rel = -0.691 + 10 * np.log10(z.mean()) - 10.0
    z = z[-0.691 + 10 * np.log10(z) > rel]
    return float(-0.691 + 10 * np.log10(z.mean()))


def _frames(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """32 ms frames [F, FRAME] every 16 ms and their centre times (s)."""
    if len(x) < FRAME:
        x = np.pad(x, (0, FRAME - len(x)))
    fr = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::HOP]
    return fr, (np.arange(len(fr)) * HOP + FRAME / 2) / SR


def levels_dbfs(fr: np.ndarray) -> np.ndarray:
    """RMS level of each frame, dBFS (a full-scale square wave is 0), floored at -120."""
    return 20 * np.log10(np.maximum(np.sqrt((fr.astype(np.float64) ** 2).mean(1)), 1e-6))


def _mask(times: np.ndarray, spans: list[tuple[float, float]]) -> np.ndarray:
    m = np.zeros(len(times), bool)
    for a, b in spans:
        m |= (times >= a) & (times < b)
    return m


def syllable_nuclei(x: np.ndarray, spans: list[tuple[float, float]]) -> int:
    """Count peaks of the 300-3000 Hz intensity envelope (10 ms hop, 30 ms smoothing) inside
    `spans` (seconds from the start of x): prominent by NUCLEUS_PROMINENCE_DB, 100 ms apart, and
    within 25 dB of the loudest speech peak."""
    if len(x) < FRAME or not spans:
        return 0
    y = signal.sosfilt(signal.butter(2, (300, 3000), "bandpass", fs=SR, output="sos"), x.astype(np.float64))
    hop = SR // 100
    n = len(y) // hop
    env = np.sqrt((y[: n * hop].reshape(n, hop) ** 2).mean(1))
    env = np.convolve(env, np.ones(3) / 3, mode="same")
    db = 20 * np.log10(np.maximum(env, 1e-6))
    t = (np.arange(n) + 0.5) / 100
    inside = _mask(t, spans)
    if not inside.any():
        return 0
    peaks, _ = signal.find_peaks(db, prominence=NUCLEUS_PROMINENCE_DB, distance=10)
    peaks = peaks[inside[peaks]]
    return int(np.sum(db[peaks] > db[inside].max() - 25.0))


def tonal_frames(fr: np.ndarray) -> np.ndarray:
    """Frames whose 100-5000 Hz spectrum is peaky (flatness < 0.1) and periodic (normalised
    autocorrelation > 0.3 at a 2.5-20 ms lag)."""
    spec = np.abs(np.fft.rfft(fr * np.hanning(FRAME), axis=1)) ** 2
    f = np.fft.rfftfreq(FRAME, 1 / SR)
    band = spec[:, (f >= 100) & (f <= 5000)] + 1e-12
    flatness = np.exp(np.log(band).mean(1)) / band.mean(1)
    c = fr - fr.mean(1, keepdims=True)
    ac = np.fft.irfft(np.abs(np.fft.rfft(c, 2 * FRAME, axis=1)) ** 2, axis=1)[:, :FRAME]
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    periodic = ac[:, int(0.0025 * SR):int(0.02 * SR)].max(1)
    return (flatness < 0.1) & (periodic > 0.3)


@dataclass
class AudioMeasures:
    loudness_lufs: float | None
    noise_floor_dbfs: float
    snr_db: float | None
    music_score: float | None
    nuclei: int
    speech_s: float


def measure_audio(x: np.ndarray, speech: list[tuple[float, float]]) -> AudioMeasures:
    """Clip-level acoustic numbers; `speech` are intervals in seconds from the start of x."""
    fr, t = _frames(x)
    lvl = levels_dbfs(fr)
    floor = float(np.percentile(lvl, 10))
    in_speech = _mask(t, [(a - 0.1, b + 0.1) for a, b in speech])
    snr = float(np.median(lvl[in_speech]) - floor) if in_speech.any() else None
    outside = ~in_speech
    music = None
    if outside.sum() * HOP / SR >= MIN_NONSPEECH_S:
        music = float(np.mean((lvl[outside] > MUSIC_MIN_DBFS) & tonal_frames(fr[outside])))
    return AudioMeasures(loudness_lufs(x), floor, snr, music, syllable_nuclei(x, speech),
                         float(sum(b - a for a, b in speech)))


# ---------------------------------------------------------------------------------------------
# visual measures (RGB uint8 frames)

def measure_frames(frames: np.ndarray) -> dict[str, float | None]:
    if not len(frames):
        return {"brightness": None, "contrast": None, "colorfulness": None}
    rgb = frames.astype(np.float32)
    y = rgb @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colorful = [np.hypot(a.std(), b.std()) + 0.3 * np.hypot(a.mean(), b.mean()) for a, b in zip(rg, yb)]
    return {"brightness": float(y.mean()), "contrast": float(np.mean([f.std() for f in y])),
            "colorfulness": float(np.mean(colorful))}


# ---------------------------------------------------------------------------------------------
# chunks

def chunk_spans(row: dict, min_gap: float) -> tuple[list[dict], str]:
    """Chunks [{start, end, speaker, category}] covering the clip's speech and the gaps of at least
    `min_gap` seconds between it, in order, and where the speech came from."""
    t0, t1 = float(row["start_s"]), float(row["end_s"])
    if row.get("speech_turns") is not None:
        source = "speech_turns"
        speech = [{"start": s["start"], "end": s["end"], "speaker": s["speaker"], "category": s["category"]}
                  for s in row["speech_turns"] if s.get("kept") is not False]
    else:
        source = "speech_segments"
        speech = [{"start": s["start"], "end": s["end"], "speaker": None, "category": "speech"}
                  for s in row.get("speech_segments") or []]
    speech = sorted(({**s, "start": max(t0, s["start"]), "end": min(t1, s["end"])} for s in speech
                     if min(t1, s["end"]) > max(t0, s["start"])), key=lambda s: s["start"])
    gaps, cursor = [], t0
    for s in speech + [{"start": t1, "end": t1}]:
        if s["start"] - cursor >= min_gap:
            gaps.append({"start": cursor, "end": s["start"], "speaker": None, "category": "silence"})
        cursor = max(cursor, s["end"])
    return sorted(speech + gaps, key=lambda c: (c["start"], c["end"])), source


# ---------------------------------------------------------------------------------------------
# models from local directories

class Transcriber:
    """A Whisper-family speech-to-text model (AutoModelForSpeechSeq2Seq) from a local folder; its
    processor's feature extractor makes the input and its tokenizer decodes the generated ids."""

    def __init__(self, path: str | Path, max_new_tokens: int = 128):
        from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer

        self.path = model_dir(path, "--asr")
        self.features = load("--asr", self.path, lambda: AutoFeatureExtractor.from_pretrained(str(self.path), local_files_only=True))
        self.tokenizer = load("--asr", self.path, lambda: AutoTokenizer.from_pretrained(str(self.path), local_files_only=True))
        self.model = load("--asr", self.path, lambda: AutoModelForSpeechSeq2Seq.from_pretrained(
            str(self.path), local_files_only=True).eval())
        self.name = f"asr:{self.model.config.model_type}({self.path.name})"
        self.max_new_tokens = max_new_tokens

    def __call__(self, audio: np.ndarray) -> str:
        import torch

        pieces = []
        step = int(WHISPER_WINDOW_S * SR)
        for a in range(0, len(audio), step):
            feats = self.features(audio[a:a + step], sampling_rate=SR, return_tensors="pt")
            with torch.no_grad():
                ids = self.model.generate(feats.input_features, max_new_tokens=self.max_new_tokens)
            pieces.append(self.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return " ".join(p for p in pieces if p)


def parse_visual_json(answer: str) -> dict[str, str] | None:
    """The VISUAL_KEYS of the first JSON object in a model's answer (code fences allowed); None
    when there is no parsable object. Lists become comma-joined strings; empty values are dropped."""
    obj = first_json_object(answer)
    if obj is None:
        return None
    return {k: v for k in VISUAL_KEYS if (v := as_label(obj.get(k))) is not None}


# ---------------------------------------------------------------------------------------------
# rendering measured numbers into words

def _people(row: dict) -> str | None:
    n = row.get("subject_count")
    if n is None:
        return None
    if n == 0:
        return "no face on screen"
    out = "one person on screen" if n == 1 else f"{n} people on screen"
    if row.get("face_area_ratio") is not None:
        out += f", {words(row['face_area_ratio'], FACE_AREA_WORDS)} (face {100 * row['face_area_ratio']:.1f}% of the frame"
        box = row.get("face_box")
        if box:
            cx = (box[0] + box[2]) / 2
            out += ", " + ("left of centre" if cx < 0.4 else "right of centre" if cx > 0.6 else "centred")
        out += ")"
    if row.get("face_frame_ratio") is not None:
        out += f", face seen in {100 * row['face_frame_ratio']:.0f}% of sampled frames"
    return out


def _camera(row: dict) -> str | None:
    v = row.get("camera_motion")
    return None if v is None else f"{words(v, CAMERA_WORDS)} (global motion {v:.3f} frame widths/s)"


def _motion(row: dict) -> str | None:
    v = row.get("subject_motion")
    return None if v is None else f"subject {words(v, SUBJECT_MOTION_WORDS)} (mean luma change {v:.4f} in its box)"


def _lighting(v: dict) -> str | None:
    if v["brightness"] is None:
        return None
    return (f"{words(v['brightness'], BRIGHTNESS_WORDS)}, {words(v['contrast'], CONTRAST_WORDS)}, "
            f"{words(v['colorfulness'], COLOR_WORDS)} (mean luma {v['brightness']:.2f}, RMS contrast "
            f"{v['contrast']:.2f}, colourfulness {v['colorfulness']:.0f})")


def _speakers(row: dict, chunks: list[dict], source: str) -> str:
    speech = [c for c in chunks if c["category"] != "silence"]
    if not speech:
        return "no speech"
    total = sum(c["end"] - c["start"] for c in speech)
    turns = f"{len(speech)} turn{'s' if len(speech) > 1 else ''}"
    if source == "speech_segments":
        return f"{total:.2f} s of speech in {turns} (voice activity, speakers not diarized)"
    labels = sorted({c["speaker"] for c in speech if c["speaker"]})
    who = "one speaker" if len(labels) == 1 else f"{len(labels)} speakers"
    parts = [f"{total:.2f} s of kept speech in {turns} by {who}"]
    for key, name in (("onscreen_s", "on screen"), ("offscreen_s", "off screen"), ("overlap_s", "overlapping")):
        if row.get(key):
            parts.append(f"{row[key]:.2f} s {name}")
    return ", ".join(parts)


def _sound(a: AudioMeasures, rate: float | None, unit: str) -> str:
    if a.loudness_lufs is None and a.noise_floor_dbfs <= -119.0:
        return "no audio signal (digital silence)"
    loud = "below the -70 LUFS gate" if a.loudness_lufs is None else f"{a.loudness_lufs:.1f} LUFS"
    out = f"loudness {loud}, {words(a.noise_floor_dbfs, NOISE_WORDS)} (noise floor {a.noise_floor_dbfs:.1f} dBFS"
    out += f", speech {a.snr_db:.1f} dB above it)" if a.snr_db is not None else ")"
    if rate is not None:
        out += f", speaking rate {rate:.1f} {unit}"
    return out


def _music(score: float | None) -> str:
    if score is None:
        return f"not measurable (under {MIN_NONSPEECH_S} s without speech)"
    return f"{words(score, MUSIC_WORDS)} (tonal non-speech share {score:.2f})"


def _chunk_text(c: dict, piece: np.ndarray, loud: float | None, rate: float | None, unit: str,
                said: str | None) -> str:
    d = c["end"] - c["start"]
    if loud is not None:
        level = f"{loud:.1f} LUFS"
    else:  # under one 400 ms loudness block, or below the -70 LUFS gate
        level = f"{float(levels_dbfs(piece[None]).max()) if len(piece) else -120.0:.1f} dBFS RMS"
    if c["category"] == "silence":
        return f"no speech for {d:.2f} s ({level})"
    who = f"{c['speaker']} ({c['category']}) speaks" if c["speaker"] else "speech (voice activity; speaker not diarized)"
    out = f"{who} for {d:.2f} s at {level}"
    if rate is not None:
        out += f", {rate:.1f} {unit}"
    return out + (f': "{said}"' if said else "")


def render(fields: dict[str, str | None]) -> str:
    labels = (("cap_subject", "Subject"), ("cap_people", "People"), ("cap_action", "Action"), ("cap_emotion", "Emotion"),
              ("cap_motion", "Motion"), ("cap_scene", "Scene"), ("cap_camera", "Camera"), ("cap_lighting", "Lighting"),
              ("cap_onscreen_text", "On-screen text"), ("cap_dialogue", "Dialogue"), ("cap_sound", "Sound"),
              ("cap_music", "Music"))
    return " ".join(f"{name}: {fields[k]}." for k, name in labels if fields.get(k))


# ---------------------------------------------------------------------------------------------

@dataclass
class Caption(Stage):
    name: ClassVar[str] = "caption"
    kind: ClassVar[str] = "captioned"
    version: ClassVar[str] = "2"
    # + the filter and diarize measurements when the input carries them
    reads: ClassVar[tuple[str, ...]] = ("id", "video_path", "start_s", "end_s", "speech_segments")
    writes: ClassVar[tuple[str, ...]] = tuple(f.name for f in CAPTION_COLUMNS)

    vlm: str | None = None  # local vision-language model directory
    asr: str | None = None  # local Whisper-family directory
    frames: int = ranged(8, min=1)  # frames shown at evenly spaced times, for the lighting measures (longer side <= 448 px)
    vlm_frames: int = ranged(4, min=1)  # of those, shown to the VLM
    min_gap: float = ranged(0.5, min=0)  # shortest silence between speech chunks that becomes a chunk (s)
    max_new_tokens: int = ranged(256, min=1)

    def setup(self) -> None:
        self._asr = Transcriber(self.asr, min(self.max_new_tokens, 128)) if self.asr else None
        self._vlm = VisionLanguageModel(self.vlm, "--vlm", self.max_new_tokens) if self.vlm else None

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("captioned", **{**item, "status": "error"})

    def process(self, item: dict) -> dict:
        row = base_row("captioned", **item)
        t0, t1 = float(item["start_s"]), float(item["end_s"])
        audio = clip_audio(item["video_path"], t0, t1, SR)
        frames, _ = clip_frames(item["video_path"], t0, t1, fps=self.frames / max(t1 - t0, 1e-3), max_side=448)
        frames = frames[: self.frames]
        chunks, source = chunk_spans(item, self.min_gap)
        speech = [(c["start"] - t0, c["end"] - t0) for c in chunks if c["category"] != "silence"]
        a = measure_audio(audio, speech)
        v = measure_frames(frames)

        chunk_rows, said_all, labelled = [], [], []
        for c in chunks:
            piece = audio[int(round((c["start"] - t0) * SR)):int(round((c["end"] - t0) * SR))]
            said = self._asr(piece) if self._asr and c["category"] != "silence" else None
            rate, unit = self._rate(piece, said, [(0.0, c["end"] - c["start"])]) if c["category"] != "silence" else (None, "")
            loud = loudness_lufs(piece)
            if said:
                said_all.append(said)
                labelled.append(f"{c['speaker']}: {said}" if c["speaker"] else said)
            chunk_rows.append({**c, "text": _chunk_text(c, piece, loud, rate, unit, said), "transcript": said,
                               "loudness_lufs": loud})
        rate, unit = self._rate(audio, " ".join(said_all) if self._asr else None, speech)

        fields: dict[str, str | None] = {k: None for k in self.writes if k.startswith("cap_")}
        fields.update(cap_people=_people(item), cap_camera=_camera(item), cap_motion=_motion(item), cap_lighting=_lighting(v))
        dialogue = _speakers(item, chunks, source)
        if labelled:
            dialogue += ": " + " / ".join(f'"{s}"' for s in labelled)
        elif speech and self._asr:
            dialogue += "; the ASR model returned no words"
        elif speech:
            dialogue += "; not transcribed"
        fields.update(cap_dialogue=dialogue, cap_sound=_sound(a, rate, unit), cap_music=_music(a.music_score))
        sources = ["measured"]
        if self._vlm is not None and len(frames):
            pick = np.linspace(0, len(frames) - 1, min(self.vlm_frames, len(frames))).round().astype(int)
            answer = self._vlm(frames[pick], VLM_PROMPT)
            row["vlm_answer"] = answer
            for k, val in (parse_visual_json(answer) or {}).items():
                fields[f"cap_{k}"] = val
            sources.append(f"vlm:{self._vlm.name}")
        if self._asr is not None:
            sources.append(self._asr.name)
        row.update(fields)
        row.update(caption=render(fields), caption_source=" + ".join(sources), chunk_captions=chunk_rows,
                   chunk_source=source, transcript=" ".join(labelled) if self._asr else None,
                   loudness_lufs=a.loudness_lufs, noise_floor_dbfs=a.noise_floor_dbfs, snr_db=a.snr_db,
                   speech_rate=rate, speech_rate_unit=unit or None, music_score=a.music_score, **v)
        return row

    def _rate(self, audio: np.ndarray, said: str | None, spans: list[tuple[float, float]]) -> tuple[float | None, str]:
        """Words per second of speech from a transcript, else syllable nuclei per second of speech."""
        seconds = sum(b - a for a, b in spans)
        if seconds < 0.25:
            return None, ""
        if said is not None:
            return len(said.split()) / seconds, "words/s"
        return syllable_nuclei(audio, spans) / seconds, "syllables/s"
