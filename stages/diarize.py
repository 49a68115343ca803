"""`vidu diarize`: who speaks when in each clip, on screen or off, and how clean the speech is.

Method (default, no model download: silero-vad and resemblyzer ship their weights in PyPI):
- 16 kHz mono audio of the clip; speech regions from silero-vad.
- Speaker turns: resemblyzer VoiceEncoder embeddings of sliding windows (`WINDOW_S`, hop `HOP_S`)
  inside speech, each window scaled to -30 dBFS first (the encoder reads linear mel energies);
  average-linkage agglomerative clustering on cosine distance cut at `threshold` (or at
  `num_speakers` clusters); clusters with less than `min_speaker_share` of the speech (or less
  than `MIN_SPEAKER_S` seconds) are folded into the nearest remaining centroid, repeated until
  stable. Every 10 ms of speech takes the label of the window in which it sits most centrally;
  turns are the contiguous runs. `--pyannote DIR` runs a local pyannote.audio pipeline instead.
- Overlap (two voices at once): 10 ms frames that two methods both flag (`both_overlap`, the AND rule),
  then runs of 0.2 s or more: the embedding-spread heuristic below AND the trained detector of
  stages/sense/overlap.py at `overlap_threshold` (default 0.5, session 29's threshold), whose runs
  count only where their smoothed probability reaches `overlap_peak` (0.85, hysteresis; since
  2026-12-04, stage version 7). The peak was chosen on train-side audio only
  (benchmarks/overlap_detector.py choose_peak: the lowest peak at which no train-side turn-taking,
  voice-over-music or single-voice clip flags; retalking_1-3 taking turns flagged 10 of 12 clips
  without it, because the heuristic flags the blocks that hold both voices and the detector fires at
  0.7-0.83 inside single voices). Held out (RESULTS.md 2026-12-04, "hysteresis"): TTS turn-taking
  2.11 s in 6 of 20 clips -> 0, TTS voice over music 0.42 s -> 0, real single voices 0 -> 0; mixtures
  still flagged: TTS 16 of 20 clips (18 without; frame recall 0.39 -> 0.30), both real mixtures
  (recall 0.29 -> 0.14 and 0.64 -> 0.46, precision 1.00). The numbers below are before it. Each one's
  weakness is the other's strength: the heuristic never flagged a real single voice but flags
  turn-taking and one voice over music; the detector rarely flags those but flags short false overlap in
  real single voices. benchmarks/overlap_detector.py (RESULTS.md, 2026-12-04): on held-out real audio
  the AND rule flags 0 s in each single voice (retalking_4, _5, silero_test; detector alone 0 / 0.53 /
  1.00 s), in real turn-taking (detector 0.20 s) and in a real voice over music (heuristic 5.65 s),
  and 0 s in retalking_1-3; it flags both held-out real mixtures (1.61 of 5.49 s, precision 1.00; 2.81
  of 4.00 s, precision 0.91: the detector's frames; the heuristic found 0.95 / 1.00 of them), 18 of 20
  eval-split TTS mixtures (recall 0.39 vs heuristic 0.74, detector 0.53), and of 160 s of TTS
  turn-taking and voice over music 2.11 s and 0.42 s (heuristic 86 s and 110 s); pyannote_sample 0.74 s
  (precision 0.70, recall 0.28 of its 1.89 s of RTTM overlap; heuristic 5.25 s, 0.12, 0.34). Precision first: a
  clip wrongly rejected as `overlap` is lost training data; a flagged mixture clip is rejected whole.
  The heuristic: per block of `BLOCK_S` s of speech, an `overlap_score` = mean pairwise cosine
  distance of the window embeddings (hop `DENSE_HOP_S`) minus half the fraction of its 10 ms
  speech frames more than 20 dB under the block's 95th-percentile level. A mixture of two
  talkers spreads the embeddings (each window holds a different blend) and fills the syllable
  dips one talker leaves. Measured on 6 s blocks: single talkers (retalking_1-5, silero_test,
  pyannote_sample one-speaker blocks) -0.04-0.13; a retalking clip + silero_test or pyannote_sample
  speech mixed at equal loudness about 0.17-0.28, at -6 dB 0.13-0.25; `OVERLAP_SCORE` = 0.14. The
  margin is thin: a weak heuristic, not a trained overlap detector; a block where two speakers
  take turns can score over it too (pyannote_sample: 5.3 s flagged, 0.4 s true overlap).
  The detector (a small CNN on log-mel frames, weights shipped in the package): median-smoothed 10 ms
  frames with P(two voices) over the threshold, in runs of 0.2 s or more, inside the turns; a turn's
  `overlap_score` is the highest smoothed probability inside it. Alone at 0.5 (session 29): it flags far
  less turn-taking and voice-over-music than the heuristic (eval-split TTS: 1.9 s vs 94 s and 0.4 s
  vs 110 s in 160 s each) and pyannote_sample better (2.0 s flagged, precision 0.68, recall 0.72, vs
  5.3 s, 0.12, 0.34; 1.9 s of RTTM overlap), but on real voices it flags 0.2-1.0 s in 5 of 6
  single-voice recordings (retalking_1-5, silero_test; 2.9 s in all; the heuristic none), which
  `max_overlap` 0 would reject, 0.7 s of two real speakers taking turns (heuristic 0) and finds only
  1.6 of 3.7 s of a real two-voice mixture (heuristic 3.6): trained on TTS and formant voices only,
  so neither method alone decides.
  With a pyannote pipeline the overlap is the pipeline's own (two speakers active at once).
- Active speaker: the shared mouth track (stages/sense/mouth.py: the frame shown at each time of the
  25 fps grid from the clip start, by stages.sense.media.frames_at as every stage samples; dlib 68
  landmarks of the main face, the one overlapping the row's `face_box` when the input is a filtered
  manifest, else the largest, detected every 5 frames; a face too small for HOG at the 480 px
  analysis size, as in portrait and 1080p frames, is located at full size and tracked in a crop
  around it: before that, such clips had no face and all their speech was called offscreen; since
  version 8 the landmark box follows the face between detections and a small face is located from
  the first to the last frame, for head motion: stages/sense/mouth.py),
  mouth opening per frame; the log speech RMS in the same frame bins,
  floored outside one speaker's turns. `sync_score` = the larger of corr(opening, level) and
  corr(mouth activity, smoothed level) at the best audio-visual lag within +-0.12 s. As raw
  correlations on 5-6 s clips depend on where the pauses fall, the speaker's `confidence` is that
  score as a z-score against the same score with the audio circularly shifted (0.5 s and more):
  how far the true alignment stands above chance alignments of this very mouth track and speech.
  Onscreen when >= `min_sync` (1.0), else offscreen; no face in most frames: offscreen, confidence
  null. Measured on the five retalking clips: z 1.6-3.6 (all onscreen); the same mouths paired with
  the other clips' or other speakers' speech: 10-15 % pass at 1.0-1.5, because two 5 s tracks can
  pause at the same moments by chance.
- Speech-energy ratio per turn: 300-3400 Hz energy over total energy (0-8 kHz); turns below
  `min_energy_ratio` are discarded (`low_speech_ratio`).
- A/V offset (`av_offset_frames`, positive = audio late; `av_sync_confidence`): `vidu eval`'s lip-sync
  proxy (stages/sense/lipsync.py, the code stages/eval/metrics/sync.py scores with; it sits in sense
  because the layer contracts keep diarize and eval independent) on the mouth track's own landmarks
  (no second tracking), already on the 25 fps grid from the clip start (a source under 25 fps or with
  a variable rate repeats the frame on screen), against the clip's audio: the
  argmax of r(k), k = -15..15 frames, and its peak over median. Null (never a reason) without speech
  turns, a face in 25 fitted frames, recognised speech, or 2.2 s (55 frames). A clip whose |offset|
  is over `max_av_offset` (3 frames = 120 ms) at a confidence of `min_av_confidence` (0.40) or more is
  desynchronised: its speaker analysis above reads the level at the measured lag (mouth frame t
  against the sound at t + offset / 25 s; its own search spans only +-0.12 s), so a late voice is
  not taken for an offscreen one, and the clip is rejected `av_desync`, or with `fix_av_offset` kept
  with `av_shift_s` = offset / 25: the sound of the frame at t is at t + av_shift_s, the shift a
  consumer has to undo (read the audio from start_s + av_shift_s). `vidu embed` applies it: it reads
  the audio of a frame at t from t + av_shift_s, so the training samples of a fixed clip are re-timed.
  Measured on diarize's track of the five retalking clips (16 kHz audio as decoded, delays in memory),
  offset / confidence:

      clip   own audio    audio +0.5 s   audio +80 ms   the other 4 clips' audio (offset, confidence)
      1      -1  0.567    12  0.515       1  0.544     -1 .265  -1 .244  11 .270   9 .239
      2      +1  0.430    14  0.586       3  0.564     -2 .315   0 .304   7 .266  -4 .338
      3      +1  0.767    13  0.686       3  0.767      1 .521  -4 .254 -10 .285 -12 .241
      4      +1  0.486    13  0.436     -10  0.345     12 .313  -3 .088  14 .284  15 .278
      5       0  0.439    12  0.478       2  0.424     -4 .360 -10 .321   6 .242   3 .416

  and clip 1's face dubbed with silero_test.wav at 0/10/20/30/40/50 s (tests/test_diarize.py's dubs):
  15 .206, -7 .139, 3 .215, 0 .301, -15 .242, 14 .362. Own and delayed audio: confidence 0.430-0.767;
  mismatched audio up to 0.521 (a chance peak, but at offsets within +-3), and at most 0.362 where the
  offset is over 3: `min_av_confidence` 0.40 lies between, so at the defaults all five +0.5 s delays are
  av_desync, none of the own, +80 ms or 26 mismatched pairings is. Thin margins (0.03-0.04 each
  side): the proxy is a weak estimator, and +80 ms on clip 4 moves its peak to -10 (at 0.345, under
  the minimum). tests/test_diarize_avsync.py: clip 1 with its audio re-encoded (AAC) own -1 0.567,
  +0.5 s 12 0.467, +80 ms 1 0.540, clip 4's audio 11 0.296. Costs the proxy's pocketsphinx pass, about
  one second of CPU per second of speech clip.
  The numbers above were measured when the mouth track took the first frame at or after each grid
  time (diarize version 4). With the frame shown at each grid time (version 5), re-measured on the
  test's clips: clip 1 own -1 0.567, +0.5 s 11 0.513 (12 frames after its own), +80 ms 1 0.570;
  speaker z on the five full retalking clips 2.70 3.83 1.49 3.11 2.13 (was 3.12 3.60 1.63 3.62 2.13).
  With the box that follows the face (version 8): clip 1 own -1 0.551, +0.5 s 11 0.509, +80 ms 1
  0.537, clip 4's audio 10 0.236; speaker z 2.74 3.92 1.42 3.22 1.71.
- Clip verdict: no speech -> rejected `no_speech`; overlap over `max_overlap` s (default 0) -> `overlap`;
  more than `max_offscreen_share` of the speech outside overlap offscreen -> `offscreen_speech` (lip-sync
  data needs the voice of the face on screen); a confident A/V offset over `max_av_offset` frames ->
  `av_desync` (unless `fix_av_offset`); kept (clean) speech under `min_clean_speech` seconds ->
  `too_little_speech`. The first that applies is the clip's reason.

Library: `diarize_audio` / `diarize_file` (a bare audio file), `segment_rows` (the segments
manifest rows of diarized rows).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from manifests.schemas import DIARIZE_COLUMNS
from stages.sense.media import clip_audio, load_audio
from stages.sense.lipsync import sync_curve, sync_fields
from stages.sense.mouth import FACE_FPS, RMS_FLOOR, frame_level, mouth_landmarks, opening_by_width
from stages.run import Stage, base_row, ranged
from stages.sense.overlap import HOP_S as OVERLAP_HOP_S, MIN_OVERLAP_S, load_detector, overlap_probs, overlap_regions, smooth_probs
from stages.sense.speech import SAMPLE_RATE, load_vad, speech_segments

WINDOW_S, HOP_S = 1.5, 0.75  # speaker-embedding windows for clustering
DENSE_HOP_S = 0.25  # windows for the overlap score
BLOCK_S = 6.0  # overlap is scored per speaker in blocks of this many seconds
FRAME_S = 0.01  # turn resolution
MIN_SPEAKER_S = 2.0
OVERLAP_SCORE = 0.14
OVERLAP_THRESHOLD = 0.5  # the detector's P(two voices) inside the AND rule (session 29's threshold)
# hysteresis: a detector run over OVERLAP_THRESHOLD counts only where its smoothed P reaches this
# somewhere (chosen on train-side audio only: benchmarks/overlap_detector.py choose_peak, RESULTS.md 2026-12-04)
OVERLAP_PEAK = 0.85
DIP_DB = 20.0
SPEECH_BAND = (300.0, 3400.0)
ACTIVITY_S = 0.32  # window of the mouth-activity average
SYNC_LAG_S = 0.12  # audio-visual offsets searched
NULL_MIN_S, NULL_STEP_S = 0.5, 0.12  # circular shifts of the audio that make the chance distribution
METHOD = "silero-vad+resemblyzer"
MIN_AV_CONFIDENCE = 0.40  # sync-curve peak over median from which an A/V offset counts (module doc)


@dataclass
class Turn:
    start: float  # seconds from the start of the analysed audio
    end: float
    speaker: str
    overlap_score: float | None = None


@dataclass
class Diarization:
    speech: list[tuple[float, float]]
    turns: list[Turn]
    overlap: list[tuple[float, float]] = field(default_factory=list)  # two voices at once
    method: str = METHOD


# ---------------------------------------------------------------------------------------------
# speaker turns

def load_encoder():
    from resemblyzer import VoiceEncoder

    return VoiceEncoder("cpu", verbose=False)


def speech_windows(speech: list[tuple[float, float]], window: float, hop: float) -> list[tuple[float, float]]:
    """Windows of `window` s every `hop` s inside each speech region (a shorter region: itself)."""
    out = []
    for a, b in speech:
        if b - a <= window:
            out.append((a, b))
            continue
        n = int(math.ceil((b - a - window) / hop)) + 1
        out += [(min(a + k * hop, b - window), min(a + k * hop, b - window) + window) for k in range(n)]
    return out


def embed_windows(encoder, audio: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """L2-normed speaker embeddings [N, 256], one per window (each scaled to -30 dBFS)."""
    import torch
    from resemblyzer.audio import wav_to_mel_spectrogram

    out = []
    for a, b in windows:
        x = audio[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)].astype(np.float32)
        x = x * (10 ** (-30 / 20) / (np.sqrt(np.mean(x ** 2)) + 1e-9))
        mel = wav_to_mel_spectrogram(x)  # [T, 40] at 100 frames/s
        with torch.no_grad():
            out.append(encoder(torch.from_numpy(mel[None]))[0].numpy())
    return np.asarray(out, np.float32).reshape(len(out), -1)


def cluster_speakers(E: np.ndarray, durations: np.ndarray, threshold: float, num_speakers: int | None,
                     min_share: float) -> np.ndarray:
    """Speaker label per window: average-linkage AHC on cosine distance, small clusters folded in."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(E) < 2:
        return np.zeros(len(E), int)
    Z = linkage(E.astype(np.float64), "average", metric="cosine")
    labels = fcluster(Z, num_speakers, "maxclust") if num_speakers else fcluster(Z, threshold, "distance")
    min_s = 0.0 if num_speakers else max(MIN_SPEAKER_S, min_share * durations.sum())
    for _ in range(10):
        ids = np.unique(labels)
        dur = np.array([durations[labels == k].sum() for k in ids])
        big = ids[dur >= min_s] if (dur >= min_s).any() else ids[[dur.argmax()]]
        C = np.stack([E[labels == k].mean(0) for k in big])
        C /= np.linalg.norm(C, axis=1, keepdims=True)
        new = big[np.argmax(E @ C.T, axis=1)]
        if (new == labels).all():
            break
        labels = new
    _, dense = np.unique(labels, return_inverse=True)
    return dense


def label_turns(speech: list[tuple[float, float]], windows: list[tuple[float, float]],
                labels: np.ndarray) -> list[Turn]:
    """Contiguous runs of the label of the window each 10 ms of speech sits most centrally in."""
    w = np.asarray(windows)
    turns: list[Turn] = []
    for a, b in speech:
        t = np.arange(a, b, FRAME_S) + FRAME_S / 2
        margin = np.minimum(t[:, None] - w[None, :, 0], w[None, :, 1] - t[:, None])  # [T, N]
        lab = labels[margin.argmax(1)]
        cuts = np.flatnonzero(np.diff(lab)) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(t)]):
            turns.append(Turn(float(a + s * FRAME_S), float(min(b, a + e * FRAME_S)), f"S{lab[s]}"))
    return turns


def _speaker_names(turns: list[Turn]) -> list[Turn]:
    """Rename speakers S0, S1, ... by first appearance."""
    names: dict[str, str] = {}
    for t in turns:
        t.speaker = names.setdefault(t.speaker, f"S{len(names)}")
    return turns


# ---------------------------------------------------------------------------------------------
# overlap evidence

def dip_fraction(audio: np.ndarray, segments: list[tuple[float, float]], depth_db: float = DIP_DB) -> float:
    """Fraction of 10 ms frames inside `segments` more than `depth_db` under their 95th percentile."""
    hop = int(FRAME_S * SAMPLE_RATE)
    n = len(audio) // hop
    if n == 0:
        return 0.0
    level = 10 * np.log10((audio[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(1) + 1e-10)
    t = (np.arange(n) + 0.5) * FRAME_S
    inside = np.zeros(n, bool)
    for a, b in segments:
        inside |= (t >= a) & (t < b)
    if inside.sum() < 10:
        return 0.0
    ref = np.percentile(level[inside], 95)
    return float(np.mean(level[inside] < ref - depth_db))


def overlap_score(E: np.ndarray, audio: np.ndarray, segments: list[tuple[float, float]]) -> float | None:
    """Embedding spread minus half the dip fraction (see the module doc); None under 3 windows."""
    if len(E) < 3:
        return None
    D = 1 - E @ E.T
    spread = float(D[np.triu_indices(len(E), 1)].mean())
    return spread - 0.5 * dip_fraction(audio, segments)


def _mark_overlap(audio: np.ndarray, encoder, turns: list[Turn]) -> list[tuple[float, float]]:
    """Score the speech in blocks of BLOCK_S seconds (the scale the score was measured at; all
    speakers together, since a mixture can split into several clusters); the speech of a block over
    OVERLAP_SCORE is overlap. A turn keeps the highest score of the blocks it touches."""
    overlap = []
    t0 = turns[0].start
    for k in range(int((turns[-1].end - t0) // BLOCK_S) + 1):
        a, b = t0 + k * BLOCK_S, t0 + (k + 1) * BLOCK_S
        segs = [(max(a, t.start), min(b, t.end)) for t in turns if min(b, t.end) - max(a, t.start) > 0.05]
        if not segs:
            continue
        score = overlap_score(embed_windows(encoder, audio, speech_windows(segs, WINDOW_S, DENSE_HOP_S)), audio, segs)
        if score is None:
            continue
        for t in turns:
            if min(b, t.end) > max(a, t.start):
                t.overlap_score = max(score, t.overlap_score if t.overlap_score is not None else -1.0)
        if score > OVERLAP_SCORE:
            overlap += segs
    return sorted(overlap)


def detect_overlap(audio: np.ndarray, turns: list[Turn], threshold: float,
                   peak: float | None = None) -> list[tuple[float, float]]:
    """Detector runs over `threshold` (stages/sense/overlap.py) that reach `peak` somewhere (None: all),
    clipped to the turns; each turn's `overlap_score` = the highest smoothed frame probability inside it."""
    probs = overlap_probs(audio)  # [T] per OVERLAP_HOP_S
    smooth = smooth_probs(probs)
    for t in turns:
        inside = smooth[int(t.start / OVERLAP_HOP_S):int(math.ceil(t.end / OVERLAP_HOP_S))]
        t.overlap_score = float(inside.max()) if len(inside) else None
    regions = overlap_regions(probs, threshold, smoothed=smooth, peak=peak)
    return merge_spans((max(a, t.start), min(b, t.end)) for a, b in regions for t in turns
                       if min(b, t.end) > max(a, t.start))


def merge_spans(spans) -> list[tuple[float, float]]:
    """(start, end) spans sorted, touching or overlapping ones merged."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1e-6:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def intersect_regions(a: list[tuple[float, float]], b: list[tuple[float, float]],
                      min_s: float = MIN_OVERLAP_S) -> list[tuple[float, float]]:
    """Time spans inside both `a` and `b` (each a list of (start, end) s, touching spans merged first),
    pieces shorter than `min_s` dropped (the detector's min-duration rule)."""
    a, b = merge_spans(a), merge_spans(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e - s >= min_s - 1e-9:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def both_overlap(audio: np.ndarray, encoder, turns: list[Turn], threshold: float,
                 peak: float | None = OVERLAP_PEAK) -> list[tuple[float, float]]:
    """Overlap where the heuristic (_mark_overlap) AND the detector at `threshold` with hysteresis `peak`
    (detect_overlap) both flag, pieces under MIN_OVERLAP_S dropped; a turn's `overlap_score` is the detector's."""
    return intersect_regions(_mark_overlap(audio, encoder, turns), detect_overlap(audio, turns, threshold, peak))


# ---------------------------------------------------------------------------------------------
# diarization of an audio array / file

def diarize_audio(audio: np.ndarray, vad, encoder, threshold: float = 0.32, num_speakers: int | None = None,
                  min_speaker_share: float = 0.15, vad_threshold: float = 0.5,
                  overlap_threshold: float = OVERLAP_THRESHOLD,
                  overlap_peak: float | None = OVERLAP_PEAK) -> Diarization:
    """Default diarization of 16 kHz mono float32 audio (see the module doc); overlap by the AND rule
    (both_overlap: the heuristic and the detector at `overlap_threshold`, hysteresis `overlap_peak`)."""
    speech = speech_segments(vad, audio, threshold=vad_threshold)
    if not speech:
        return Diarization([], [])
    windows = speech_windows(speech, WINDOW_S, HOP_S)
    E = embed_windows(encoder, audio, windows)
    labels = cluster_speakers(E, np.array([b - a for a, b in windows]), threshold, num_speakers, min_speaker_share)
    turns = _speaker_names(label_turns(speech, windows, labels))
    return Diarization(speech, turns, both_overlap(audio, encoder, turns, overlap_threshold, overlap_peak))


def load_pyannote(path: str):
    """A pyannote.audio Pipeline from a local directory (with config.yaml) or config file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--pyannote {path}: no such file or directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local pipeline only: nothing is downloaded
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")  # no telemetry
    try:
        from pyannote.audio import Pipeline

        pipeline = Pipeline.from_pretrained(str(p))
    except Exception as e:  # any loader failure becomes one line
        raise ValueError(f"--pyannote {path}: cannot load a pyannote pipeline ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if pipeline is None:
        raise ValueError(f"--pyannote {path}: cannot load a pyannote pipeline (no config.yaml)")
    return pipeline


def diarize_pyannote(audio: np.ndarray, pipeline, path: str) -> Diarization:
    import torch
    from pyannote.core import Segment

    out = pipeline({"waveform": torch.from_numpy(audio[None].astype(np.float32)), "sample_rate": SAMPLE_RATE})
    ann = getattr(out, "speaker_diarization", out)
    ann = ann.crop(Segment(0.0, len(audio) / SAMPLE_RATE))  # chunks are padded past the end
    turns = _speaker_names([Turn(float(s.start), float(s.end), str(lab))
                            for s, _, lab in ann.itertracks(yield_label=True)])
    speech = [(float(s.start), float(s.end)) for s in ann.get_timeline().support()]
    overlap = [(float(s.start), float(s.end)) for s in ann.get_overlap()]
    return Diarization(speech, sorted(turns, key=lambda t: t.start), overlap, f"pyannote:{path}")


def diarize_file(path: str | Path, threshold: float = 0.32, num_speakers: int | None = None,
                 min_speaker_share: float = 0.15, pyannote: str | None = None) -> Diarization:
    """Diarize a bare audio (or video) file with the default method, or a local pyannote pipeline."""
    audio = load_audio(path, SAMPLE_RATE)
    if pyannote:
        return diarize_pyannote(audio, load_pyannote(pyannote), pyannote)
    return diarize_audio(audio, load_vad(), load_encoder(), threshold, num_speakers, min_speaker_share)


# ---------------------------------------------------------------------------------------------
# per-turn measures

def speech_band_ratio(audio: np.ndarray, start: float, end: float) -> float | None:
    """Energy in SPEECH_BAND over total energy of audio[start:end] (seconds)."""
    x = audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)].astype(np.float64)
    if len(x) < 256:
        return None
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    total = power[1:].sum()
    band = power[(freqs >= SPEECH_BAND[0]) & (freqs <= SPEECH_BAND[1])].sum()
    return float(band / total) if total > 0 else None


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < 10 or x.std() < 1e-9 or y.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _lagged(x: np.ndarray, k: int) -> np.ndarray:
    """x delayed by k frames (nan where nothing is known)."""
    out = np.full(len(x), np.nan)
    if k >= 0:
        out[:len(x) - k] = x[k:]
    else:
        out[-k:] = x[:len(x) + k]
    return out


def sync_score(opening: np.ndarray, level: np.ndarray) -> float:
    """How well the mouth follows the speech at its best lag within +-`SYNC_LAG_S`: the larger of
    corr(mouth opening, speech level) and corr(mouth activity, smoothed speech level), where mouth
    activity is the mean |frame-to-frame change of the opening| over `ACTIVITY_S` (articulation
    moves the mouth; a pause holds it, open or closed)."""
    from scipy.ndimage import uniform_filter1d

    w = max(1, round(ACTIVITY_S * FACE_FPS))
    filled = np.where(np.isnan(opening), np.nanmean(opening), opening)
    activity = uniform_filter1d(np.abs(np.gradient(filled)), w)
    activity[np.isnan(opening)] = np.nan
    smooth = uniform_filter1d(level, w)
    lags = range(-round(SYNC_LAG_S * FACE_FPS), round(SYNC_LAG_S * FACE_FPS) + 1)
    return max(max(_pearson(opening, _lagged(level, k)), _pearson(activity, _lagged(smooth, k))) for k in lags)


def sync_confidence(times: np.ndarray, opening: np.ndarray, level: np.ndarray,
                    turns: list[tuple[float, float]]) -> float | None:
    """The speaker's `sync_score` as a z-score against the same score with the audio circularly
    shifted by every `NULL_STEP_S` from `NULL_MIN_S` to the clip length minus that (chance
    alignments of this very mouth track and speech). The level is floored outside the speaker's
    `turns`. None when fewer than half of the frames (or fewer than 10) show a face."""
    face = ~np.isnan(opening)
    if face.sum() < max(10, 0.5 * len(opening)):
        return None
    active = np.zeros(len(times), bool)
    for a, b in turns:
        active |= (times >= a - 0.5 / FACE_FPS) & (times < b)
    own = np.where(active, level, np.log(RMS_FLOOR))
    score = sync_score(opening, own)
    lo, step = round(NULL_MIN_S * FACE_FPS), max(1, round(NULL_STEP_S * FACE_FPS))
    null = np.array([sync_score(opening, np.roll(own, k)) for k in range(lo, len(own) - lo + 1, step)])
    if len(null) < 5 or null.std() < 1e-9:
        return None
    return float((score - null.mean()) / null.std())


def av_offset(times: np.ndarray, landmarks: np.ndarray, audio: np.ndarray) -> tuple[int | None, float | None]:
    """(offset in frames, positive = audio late; confidence) of the face track `landmarks` [T, 68, 2]
    at `times` (the 25 fps grid from 0, s into the clip's 16 kHz `audio`: mouth_landmarks' grid) by
    `vidu eval`'s lip-sync proxy (stages/sense/lipsync.py); (None, None) when not measurable (no face in enough
    frames, no recognised speech, under 2.2 s)."""
    if len(times) == 0:
        return None, None
    f = sync_fields([sync_curve(landmarks, audio)])
    return f["sync_offset_frames"], f["sync_confidence"]


# ---------------------------------------------------------------------------------------------
# the stage

@dataclass
class Diarize(Stage):
    name: ClassVar[str] = "diarize"
    kind: ClassVar[str] = "diarized"
    version: ClassVar[str] = "8"
    reads: ClassVar[tuple[str, ...]] = ("id", "video_path", "start_s", "end_s")  # + face_box when filtered
    writes: ClassVar[tuple[str, ...]] = tuple(f.name for f in DIARIZE_COLUMNS)

    threshold: float = ranged(0.32, min=0, max=2)  # cosine distance where speaker clusters stop merging
    num_speakers: int | None = ranged(None, min=1)
    min_speaker_share: float = ranged(0.15, min=0, max=1)
    min_sync: float = 1.0  # mouth/speech sync z-score (vs shifted audio) from which a turn is onscreen
    min_energy_ratio: float = ranged(0.5, min=0, max=1)
    min_clean_speech: float = ranged(1.0, min=0)
    max_overlap: float = ranged(0.0, min=0)  # seconds of two voices at once a kept clip may have
    overlap_threshold: float = ranged(OVERLAP_THRESHOLD, min=0, max=1)  # detector P(two voices) inside the AND rule
    overlap_peak: float = ranged(OVERLAP_PEAK, min=0, max=1)  # a detector run counts where its P reaches this (hysteresis)
    max_offscreen_share: float = ranged(0.5, min=0, max=1)  # of onscreen + offscreen speech, in a kept clip
    vad_threshold: float = ranged(0.5, min=0, max=1)
    pyannote: str | None = None
    max_av_offset: int = ranged(3, min=0)  # frames at 25 fps (3 = 120 ms): a larger confident A/V offset is av_desync
    min_av_confidence: float = ranged(MIN_AV_CONFIDENCE, min=0)  # sync-curve peak over median from which an offset counts
    fix_av_offset: bool = False  # keep av_desync clips, their lag recorded in av_shift_s
    # measure the A/V offset at all (its phone track costs about 1 s of CPU per second of speech): off,
    # the offset fields are null and no clip is av_desync
    av_sync: bool = True

    def setup(self) -> None:
        if self.pyannote:
            self._pipeline = load_pyannote(self.pyannote)
        else:
            self._vad, self._encoder = load_vad(), load_encoder()
            load_detector()  # fails here, once, if the shipped weights are missing

    def error_row(self, item: dict, message: str) -> dict:
        row = dict(item)
        row.update(status="error", reasons=list(item.get("reasons") or []))
        return row

    def diarize(self, audio: np.ndarray) -> Diarization:
        if self.pyannote:
            return diarize_pyannote(audio, self._pipeline, self.pyannote)
        return diarize_audio(audio, self._vad, self._encoder, self.threshold, self.num_speakers,
                             self.min_speaker_share, self.vad_threshold, self.overlap_threshold, self.overlap_peak)

    def process(self, item: dict) -> dict:
        path, t0, t1 = item["video_path"], float(item["start_s"]), float(item["end_s"])
        audio = clip_audio(path, t0, t1, SAMPLE_RATE)
        d = self.diarize(audio)
        times, landmarks = (mouth_landmarks(path, t0, t1, item.get("face_box")) if d.turns
                            else (np.zeros(0), np.zeros((0, 68, 2), np.float32)))
        opening = opening_by_width(landmarks).astype(np.float64)
        offset, av_confidence = av_offset(times, landmarks, audio) if d.turns and self.av_sync else (None, None)
        desync = (offset is not None and abs(offset) > self.max_av_offset
                  and av_confidence >= self.min_av_confidence)
        # a desynchronised clip's speaker analysis reads the sound where it was measured to be (mouth
        # frame t against audio at t + offset / 25 s): the lag is not taken for an offscreen voice
        audio_times = times + (offset / FACE_FPS if desync else 0.0)
        level = frame_level(audio, audio_times)
        sync = {spk: sync_confidence(audio_times, opening, level,
                                     [(t.start, t.end) for t in d.turns if t.speaker == spk])
                for spk in {t.speaker for t in d.turns}}
        turns = [self._turn(t, d, audio, sync, t0) for t in d.turns]
        row = self._row(item, d, turns, desync and not self.fix_av_offset)
        row.update(av_offset_frames=offset, av_sync_confidence=av_confidence,
                   av_shift_s=offset / FACE_FPS if desync and self.fix_av_offset else None)
        return row

    def _turn(self, t: Turn, d: Diarization, audio: np.ndarray, sync: dict, t0: float) -> dict:
        ratio = speech_band_ratio(audio, t.start, t.end)
        overlapped = any(min(b, t.end) - max(a, t.start) > 0.5 * (t.end - t.start) for a, b in d.overlap)
        if overlapped:
            category, confidence = "overlap", t.overlap_score
        else:
            confidence = sync[t.speaker]
            category = "onscreen" if confidence is not None and confidence >= self.min_sync else "offscreen"
        kept = not overlapped and ratio is not None and ratio >= self.min_energy_ratio
        return {"start": t0 + t.start, "end": t0 + t.end, "speaker": t.speaker, "category": category,
                "energy_ratio": ratio, "confidence": confidence, "kept": kept}

    def _row(self, item: dict, d: Diarization, turns: list[dict], desync: bool = False) -> dict:
        row = dict(item)
        clean = _seconds(t for t in turns if t["kept"])
        row.update(diarize_method=d.method, speakers=len({t["speaker"] for t in turns}),
                   onscreen_s=_seconds(t for t in turns if t["category"] == "onscreen"),
                   offscreen_s=_seconds(t for t in turns if t["category"] == "offscreen"), overlap_s=float(sum(b - a for a, b in d.overlap)),
                   clean_speech_s=clean, speech_turns=turns)
        reasons = list(item.get("reasons") or [])
        if not turns:
            reasons.append("no_speech")
        elif row["overlap_s"] > self.max_overlap:
            reasons.append("overlap")
        elif row["offscreen_s"] > self.max_offscreen_share * (row["onscreen_s"] + row["offscreen_s"]):
            reasons.append("offscreen_speech")
        elif desync:
            reasons.append("av_desync")
        elif clean < self.min_clean_speech:
            reasons.append("too_little_speech")
        row.update(status="rejected" if len(reasons) > len(item.get("reasons") or []) else item.get("status", "ok"),
                   reasons=reasons)
        return row


def _seconds(turns) -> float:
    return float(sum(t["end"] - t["start"] for t in turns))


# ---------------------------------------------------------------------------------------------
# the segments manifest

def turn_reasons(turn: dict, min_energy_ratio: float) -> list[str]:
    out = []
    if turn["category"] == "overlap":
        out.append("overlap")
    if turn["energy_ratio"] is None or turn["energy_ratio"] < min_energy_ratio:
        out.append("low_speech_ratio")
    return out


def segment_rows(diarized: list[dict], min_energy_ratio: float = 0.5) -> list[dict]:
    """One `segments` row per speech turn of the diarized rows (parent_id = clip id). A turn is ok
    when kept and its clip is ok; else rejected with the turn's reasons and the clip's."""
    rows = []
    for clip in diarized:
        for k, t in enumerate(clip.get("speech_turns") or []):
            reasons = [] if t["kept"] else turn_reasons(t, min_energy_ratio)
            if clip["status"] != "ok":
                reasons += [r for r in clip["reasons"] if r not in reasons]
            rows.append(base_row("segments", id=f"{clip['id']}_t{k:03d}", parent_id=clip["id"], clip_id=clip["id"],
                                 video_path=clip.get("video_path"), run_id=clip.get("run_id") or "",
                                 status="ok" if not reasons else "rejected", reasons=reasons, **t))
    return rows
