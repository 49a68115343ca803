"""Speech content with the timbre removed: WHAT is said, per 10 ms step, and how loud, not WHO says it.

The representation (issue 19), one row per log-mel step (models/audio.py: step j is centred at clip
sample j * hop, hop = 10 ms at 16 kHz):
- `phone`: one of PHONES, the 39 ARPAbet phones of CMUdict (pocketsphinx's en-us set) and SIL, the
  phone sounding at the step's centre. Visemes (VISEME_OF, the synthetic world's 15) follow from it.
- `loud`: loudness per video frame (25 fps: steps 4k .. 4k + 3 share frame k's value), 0 where the
  phone is SIL, causal up to 160 ms so a stream reads what training does (ContentTrack): each step's
  level (dB, 400-sample window centred on it), floored 60 dB under the loudest step so far, averaged
  over the frame, smoothed over frames by a Gaussian of sigma SMOOTH_FRAMES cut at SMOOTH_RADIUS frames,
  standardised over the speech steps so far (so neither gain nor a voice's own level and spread count)
  and mapped to 0.5 + 0.25 z in [0, 1]. Why so coarse: a speaker probe (stages/synth/voice.py) on 8
  voices x 120 texts (chance 0.125) told voices apart from phones plus a per-frame level under a running
  AGC at 0.25 (phones alone: 0.127); smoothed and standardised per clip: 0.17-0.19
  (benchmarks/voice_foundation.py); this causal form: tests/test_voice.py's bound.
`features(phone, loud)` -> [T, len(PHONES) + 1] float32 (one-hot phone, loudness): the conditioning
row a model reads at the mel rate; `latent_rows` frames them per latent frame (models.audio.per_latent).

Where the phones come from:
- TTS speech: espeak-ng's own phoneme events (`from_espeak`: its mnemonics mapped by
  `espeak_to_arpabet`), the ground truth; stages/synth/voice.py makes it.
- A stream (`ContentStream`, what `vidu stream` feeds a content model): the TTS truth of `--say`, else the
  front end on fixed blocks (`block_phones`: the phone loop on 0.64 s blocks with 0.64 s before and 0.32 s
  after each), so a stream's rows do not depend on its chunks and `content(wave, "blocks")` gives them offline.
- Real speech (`recognise`): pocketsphinx, whose wheel ships the en-us acoustic model. method="words"
  recognises words (language model + CMUdict) then force-aligns their phones (stages.sense.lipsync.phones);
  method="allphone" decodes phones directly under the shipped phonetic language model, without words.
  Their agreement with the espeak truth on TTS speech is in benchmarks/RESULTS.md (2026-12-04,
  session 41), measured by benchmarks/voice_foundation.py.
Timbre: a voice classifier (stages/synth/voice.py) on these rows made from the espeak truth is at
chance on the phones (0.127-0.135, 8 voices, chance 0.125) and near it with the loudness (0.17-0.19),
where on log-mel it is at 1.00 (tests/test_voice.py). Made by the pocketsphinx front end from the same
audio, the phones tell the voices apart at 0.79: its errors depend on the voice (allphone agreement
0.11 on the child-like "zac" variant, 0.29-0.53 on the others), so real-speech content still carries
the driving speaker; a recogniser of our own trained on TTS truth (benchmarks/phone_recogniser_probe.py)
leaks less (0.20 / 0.30 on heard / unheard voices) but does not transfer to real speech.
"""
from __future__ import annotations

import copy

import numpy as np

HOP_S = 0.01  # one step: the log-mel hop (models.config.AudioConfig: 160 samples at 16 kHz)
SR = 16000
PHONES = ("SIL AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW "
          "V W Y Z ZH").split()
PHONE_ID = {p: i for i, p in enumerate(PHONES)}
FRAME_STEPS = 4  # steps per 25 fps video frame
FLOOR_DB = 60.0  # steps quieter than the clip's loudest by more read as this much under it
SMOOTH_FRAMES = 2.0  # Gaussian sigma of the loudness contour, video frames (80 ms)
SMOOTH_RADIUS = 4  # ... cut at 2 sigma: a frame's loudness waits for 4 frames (160 ms) of speech after it
LEVEL_HALF = 200  # a step's level is the RMS of the samples within 200 (12.5 ms) of its centre
BLOCK_STEPS = 64  # the front end decodes a stream in blocks of 64 steps (0.64 s; `block_phones`) ...
BLOCK_CONTEXT_STEPS = 64  # ... hearing 0.64 s before each block ...
BLOCK_LOOK_STEPS = 32  # ... and 0.32 s after it: a block's phones wait for that
DITHER_DB = -40.0  # seeded white noise this far under the clip's RMS before pocketsphinx: TTS has digital
                   # silence (12 % of its samples), where its features break (allphone on 16 held-out en-us
                   # utterances: 0.377 / 0.418 / 0.451 phone agreement with no dither / -60 dB / -40 dB)
PS_CENTRE_S = 0.0125  # pocketsphinx frame i's 25.6 ms window is centred at i * 10 ms + 12.5 ms

# The synthetic world's visemes (stages/synth/speech.py VISEMES) of each phone.
VISEME_OF = {"SIL": "sil", "P": "PP", "B": "PP", "M": "PP", "F": "FF", "V": "FF", "TH": "TH", "DH": "TH",
             "T": "DD", "D": "DD", "K": "kk", "G": "kk", "NG": "kk", "HH": "kk", "CH": "CH", "JH": "CH",
             "SH": "CH", "ZH": "CH", "S": "SS", "Z": "SS", "N": "nn", "L": "nn", "R": "RR", "ER": "RR",
             "AA": "aa", "AE": "aa", "AH": "aa", "AY": "aa", "AW": "aa", "EH": "E", "EY": "E", "IH": "ih",
             "IY": "ih", "Y": "ih", "AO": "oh", "OY": "oh", "OW": "oh", "UH": "ou", "UW": "ou", "W": "ou"}
VISEMES = tuple(dict.fromkeys(VISEME_OF.values()))

# espeak-ng mnemonics (stress marks and the variant suffixes 2 and # removed) -> ARPAbet; r-coloured
# vowels and syllabic l are two phones, the first taking 60 % of the span.
_ESPEAK = {
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "f": "F", "v": "V", "T": "TH", "D": "DH",
    "s": "S", "z": "Z", "S": "SH", "Z": "ZH", "h": "HH", "x": "HH", "tS": "CH", "dZ": "JH", "m": "M",
    "n": "N", "N": "NG", "l": "L", "r": "R", "R": "R", "w": "W", "W": "W", "j": "Y", ";": "Y", "*": "D",
    "?": "T", "a": "AE", "aa": "AE", "A": "AA", "A:": "AA", "0": "AA", "O": "AO", "O:": "AO", "V": "AH",
    "@": "AH", "@5": "AH", "E": "EH", "e": "EH", "I": "IH", "i": "IY", "i:": "IY", "U": "UH", "u": "UW",
    "u:": "UW", "y": "UW", "3": "ER", "3:": "ER", "VR": "ER", "aI": "AY", "aU": "AW", "eI": "EY",
    "oU": "OW", "o": "OW", "@U": "OW", "OI": "OY", "o:": "OW",
    "@L": ("AH", "L"), "A@": ("AA", "R"), "o@": ("AO", "R"), "O@": ("AO", "R"), "e@": ("EH", "R"),
    "i@": ("IH", "R"), "i@3": ("IH", "R"), "U@": ("UH", "R"), "aI@": ("AY", "ER"), "aU@": ("AW", "ER"),
}


def mnemonic_core(name: str) -> str | None:
    """An espeak-ng phoneme mnemonic without its stress marks; None for a pause."""
    core = name.lstrip("'%,=")
    return None if not core or core.startswith("_") else core


def span_cuts(a: float, b: float, parts: int) -> list[float]:
    """The cut points of a phoneme's span [a, b] shared by its `parts` (1 or 2) sounds: of two
    (a diphthong, an r-coloured vowel), the first takes 60 %."""
    return [a, a + 0.6 * (b - a), b] if parts == 2 else [a, b]


def espeak_to_arpabet(name: str) -> tuple[str, ...]:
    """The ARPAbet phone(s) of an espeak-ng mnemonic: ("SIL",) for pauses, by the first letter when
    the mnemonic is not in the table (other languages' phonemes)."""
    core = mnemonic_core(name)
    if core is None:
        return ("SIL",)
    for key in (core, core.rstrip("2#"), core.rstrip("2#").rstrip(":")):
        if key in _ESPEAK:
            hit = _ESPEAK[key]
            return hit if isinstance(hit, tuple) else (hit,)
    hit = _ESPEAK.get(core[0], "AH")
    return hit if isinstance(hit, tuple) else (hit,)


def from_espeak(phonemes: list[tuple[float, float, str]], offset: float = 0.0) -> list[tuple[str, float, float]]:
    """espeak-ng's timed phonemes (start s, end s, mnemonic) -> (ARPAbet phone, start s, end s),
    shifted by `offset` s."""
    out = []
    for a, b, name in phonemes:
        ps = espeak_to_arpabet(name)
        cuts = span_cuts(a, b, len(ps))
        out += [(p, s + offset, e + offset) for p, s, e in zip(ps, cuts, cuts[1:]) if e > s]
    return out


def phone_steps(segments: list[tuple[str, float, float]], T: int, start: int = 0) -> np.ndarray:
    """[T] int64 PHONE_ID of the phone sounding at the centre j * HOP_S of steps j = start .. start + T - 1
    (SIL where none; unknown names, e.g. pocketsphinx's +NSN+ noise, are SIL)."""
    out = np.zeros(T, np.int64)
    for p, s, e in segments:
        a = max(0, int(np.ceil(s / HOP_S - 1e-9)) - start)
        b = min(T, int(np.ceil(e / HOP_S - 1e-9)) - start)
        if b > a:
            out[a:b] = PHONE_ID.get(p, 0)
    return out


def step_level(audio: np.ndarray, T: int) -> np.ndarray:
    """[T] float64: the level of each step of 16 kHz `audio`, dB (`step_levels` of the whole clip)."""
    return step_levels(_Samples(np.asarray(audio, np.float32)), 0, T)


def step_levels(x: "_Samples", j0: int, j1: int) -> np.ndarray:
    """[j1 - j0] float64: the level of steps j0 .. j1 - 1 of a stream (`x`, its samples), dB: the power of the
    2 x LEVEL_HALF samples centred on j * hop, those before the stream absent (not counted), those past its
    window silence (counted); digital silence reads -200 dB (floored later, FLOOR_DB)."""
    if j1 <= j0:
        return np.zeros(0, np.float64)
    hop = round(HOP_S * SR)
    seg = x.get(j0 * hop - LEVEL_HALF, (j1 - 1) * hop + LEVEL_HALF)
    win = np.lib.stride_tricks.sliding_window_view(seg, 2 * LEVEL_HALF)[::hop]          # [j1 - j0, 400]
    n = 2.0 * LEVEL_HALF - np.clip(LEVEL_HALF - np.arange(j0, j1) * hop, 0, None)
    return 10 * np.log10(np.einsum("ij,ij->i", win, win) / n + 1e-20)


def loudness(audio: np.ndarray, phone: np.ndarray) -> np.ndarray:
    """[T] float32 in [0, 1] (module docstring) of 16 kHz `audio` with its [T] phone ids: what a stream of
    those samples reads (ContentTrack; samples past the end are silence)."""
    track = ContentTrack(phone)
    return track.rows(_Samples(np.asarray(audio, np.float32)), len(phone))[1][: len(phone)]


class _Samples:
    """A window of a stream's samples: buf[0] is stream sample `origin`; samples past buf are zeros,
    those before `origin` were forgotten (a read there is a bug)."""

    def __init__(self, buf: np.ndarray, origin: int = 0):
        self.buf, self.origin = buf, origin

    def get(self, a: int, b: int) -> np.ndarray:
        """Stream samples [a, b) as float64, zeros past the window (a < 0: zeros before sample 0)."""
        out = np.zeros(b - a, np.float64)
        lo, hi = max(a, 0), min(b, self.origin + len(self.buf))
        if lo < self.origin and lo < hi:
            raise ValueError(f"samples from {lo} were forgotten (the window starts at {self.origin})")
        if hi > lo:
            out[lo - a: hi - a] = self.buf[lo - self.origin: hi - self.origin]
        return out

    @property
    def end(self) -> int:
        return self.origin + len(self.buf)


def _taps() -> np.ndarray:
    k = np.arange(-SMOOTH_RADIUS, SMOOTH_RADIUS + 1)
    w = np.exp(-0.5 * (k / SMOOTH_FRAMES) ** 2)
    return w / w.sum()


class ContentTrack:
    """The content of one speech stream, video frame by video frame in order: each step's phone (from
    `phones`: [T] ids or (phone, start s, end s) segments on the stream's timeline, e.g. the TTS truth;
    None: the front end, pocketsphinx's phone loop on fixed blocks, `block_phones`) and its loudness, causal
    up to the contour's SMOOTH_RADIUS frames of lookahead:
    - a step's level: dB, RMS of the 400 samples centred on it (samples before the stream are absent,
      those past what has arrived are silence);
    - a frame's contour: a Gaussian (sigma SMOOTH_FRAMES) reaching SMOOTH_RADIUS frames each side (the
      stream's first frame repeated before it) of frame levels, each the mean of its FRAME_STEPS steps'
      levels floored at FLOOR_DB under the loudest step up to the last one the contour reads (gain does
      not count, nor digital silence's level once speech was heard);
    - standardised over the speech steps so far, this one included (neither gain nor a voice's own level
      and spread count) and mapped to 0.5 + 0.25 z in [0, 1]; 0 where the phone is SIL.
    Every quantity is a function of the samples and phones, whatever the pieces they come in: a stream
    fed chunk by chunk reads what one feed of the whole gives (`loudness`, `content`, training's rows)."""

    def __init__(self, phones=None):
        self.phones = phones
        self.done = 0                  # frames final so far (their steps' rows made)
        self.levels: list = []         # step levels [FRAME_STEPS] of frames [lo, lo + len) (lo = max(0, done - R))
        self.lo = 0
        self.peak = -np.inf            # the loudest step level of the frames in `levels` and before
        self.sums = np.zeros(3)        # speech steps so far: count, sum and sum of squares of their contour
        self.blocks: dict = {}         # the front end's phones of each decoded block

    def samples_for(self, frames: int) -> int:
        """Stream samples that the rows of frames [0, frames) read."""
        if frames <= 0:
            return 0
        hop = round(HOP_S * SR)
        last = (frames - 1 + SMOOTH_RADIUS) * FRAME_STEPS + FRAME_STEPS - 1   # the contour's last step
        need = last * hop + LEVEL_HALF
        if self.phones is None:
            block = ((frames - 1) * FRAME_STEPS + FRAME_STEPS - 1) // BLOCK_STEPS
            need = max(need, block_window(block)[1])
        return need

    def forget_before(self) -> int:
        """The first stream sample a later frame can read."""
        hop = round(HOP_S * SR)
        first = self.lo + len(self.levels)                # the next frame whose level is made
        need = first * FRAME_STEPS * hop - LEVEL_HALF
        if self.phones is None:
            need = min(need, block_window(self.done * FRAME_STEPS // BLOCK_STEPS)[0])
        return max(0, need)

    def _level(self, x: _Samples, k0: int, k1: int) -> np.ndarray:
        return step_levels(x, k0 * FRAME_STEPS, k1 * FRAME_STEPS).reshape(-1, FRAME_STEPS)

    def _phone(self, x: _Samples, j0: int, j1: int) -> np.ndarray:
        if self.phones is None:
            out = []
            for b in range(j0 // BLOCK_STEPS, (j1 - 1) // BLOCK_STEPS + 1):
                if b not in self.blocks:
                    self.blocks[b] = block_phones(x, b)
                a = b * BLOCK_STEPS
                out.append(self.blocks[b][max(j0, a) - a: min(j1, a + BLOCK_STEPS) - a])
            return np.concatenate(out)
        if isinstance(self.phones, np.ndarray):
            got = self.phones[j0:j1]
            return np.pad(got, (0, j1 - j0 - len(got)))
        return phone_steps(self.phones, j1 - j0, j0)

    def advance(self, x: _Samples, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Make frames [done, frames) final from `x` (which must hold what they read: samples_for); returns
        their steps' phone ids and loudness."""
        k0, k1 = self.done, frames
        if k1 <= k0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        have = self.lo + len(self.levels)
        new = self._level(x, have, k1 + SMOOTH_RADIUS)
        peaks = np.maximum.accumulate(np.concatenate([[self.peak], new.max(1)]))[1:]   # by frames have .. k1 + R - 1
        self.peak = float(peaks[-1])
        raw = np.concatenate([np.asarray(self.levels, np.float64).reshape(-1, FRAME_STEPS), new])   # frames lo ..
        head = k0 - SMOOTH_RADIUS - self.lo                                       # < 0: before frame 0
        g = np.concatenate([np.repeat(raw[:1], max(0, -head), 0), raw])[max(0, head):]   # frames k0 - R ..
        floor = peaks[np.arange(k0, k1) + SMOOTH_RADIUS - have] - FLOOR_DB       # the loudest step by frame k + R
        smooth = np.zeros(k1 - k0)
        for i, w in enumerate(_taps()):     # each step floored under the loudest one this frame's contour reads
            steps = np.maximum(g[i: i + k1 - k0], floor[:, None])
            smooth = smooth + w * ((steps[:, 0] + steps[:, 1] + steps[:, 2] + steps[:, 3]) / FRAME_STEPS)
        keep = max(0, k1 - SMOOTH_RADIUS)
        self.levels, self.lo = list(raw[keep - self.lo:]), keep
        phone = self._phone(x, k0 * FRAME_STEPS, k1 * FRAME_STEPS)
        speech = phone > 0
        s = np.repeat(smooth, FRAME_STEPS) * speech
        acc = [np.cumsum(np.concatenate([[self.sums[i]], v]))[1:] for i, v in enumerate((speech * 1.0, s, s * s))]
        self.sums = np.array([a[-1] for a in acc])
        n = np.maximum(acc[0], 1)
        mean = acc[1] / n
        std = np.sqrt(np.maximum(acc[2] / n - mean * mean, 0))
        z = (np.repeat(smooth, FRAME_STEPS) - mean) / (std + 0.5)   # + 0.5 dB: a flat contour stays 0.5
        loud = (np.clip(0.5 + 0.25 * z, 0, 1) * speech).astype(np.float32)
        self.done = k1
        return phone, loud

    def fork(self) -> "ContentTrack":
        """A copy to advance provisionally (rows past the pushed samples): `advance` replaces its state rather than
        changing it in place, so the copy shares the phones (read only, as long as the stream) and the decoded
        blocks' arrays; only the block table is its own."""
        track = copy.copy(self)
        track.blocks = dict(self.blocks)
        return track

    def rows(self, x: _Samples, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The phone ids and loudness of steps [0, steps) of a fresh track, in one feed."""
        return self.advance(x, -(-steps // FRAME_STEPS))


def features(phone: np.ndarray, loud: np.ndarray) -> np.ndarray:
    """[T] phone ids and [T] loudness -> [T, len(PHONES) + 1] float32 (one-hot, loudness)."""
    if len(phone) != len(loud):
        raise ValueError(f"{len(phone)} phone steps but {len(loud)} loudness steps")
    out = np.zeros((len(phone), len(PHONES) + 1), np.float32)
    out[np.arange(len(phone)), phone] = 1
    out[:, -1] = loud
    return out


def latent_rows(phone: np.ndarray, loud: np.ndarray, n_latent: int, before: int = 0):
    """`features` on the model's latent timeline: torch [n_latent, mel_per_latent, len(PHONES) + 1]
    (models.audio.per_latent: the lead-in and missing steps are SIL at loudness 0), the content
    counterpart of models.audio.audio_features' log-mel rows."""
    import torch

    from models.audio import per_latent

    rows = per_latent(torch.as_tensor(features(phone, loud)), n_latent, pad_value=0.0, before=before)
    rows[..., 0] += (rows[..., :-1].sum(-1) == 0).to(rows.dtype)
    return rows


def steps_for(samples: int, sr: int = SR) -> int:
    """Steps of a clip of `samples` samples: centres 0, hop, ... inside it."""
    return (samples - 1) // round(HOP_S * sr) + 1 if samples > 0 else 0


# --- the front end for real speech -------------------------------------------------------------------

_allphone: list = []


def _allphone_decoder():
    if not _allphone:
        import os

        import pocketsphinx

        model = pocketsphinx.get_model_path()
        d = pocketsphinx.Decoder(loglevel="FATAL", lm=None, allphone=os.path.join(model, "en-us", "en-us-phone.lm.bin"),
                                 lw=1.0, beam=1e-20, pbeam=1e-20)  # lw 1 / 2 / 4 / 8: 0.385 / 0.364 / 0.350 / 0.223 agreement (no dither)
        d.config["remove_noise"] = False  # as stages.sense.lipsync.decoder: no carry-over between utterances
        d.reinit_feat()
        _allphone.append(d)
    return _allphone[0]


def allphone(wave: np.ndarray) -> list[tuple[str, float, float]]:
    """(phone, start s, end s) of 16 kHz speech from pocketsphinx's phone loop (no words)."""
    d = _allphone_decoder()
    d.start_utt()
    d.process_raw((np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
    d.end_utt()
    return [(s.word, s.start_frame * HOP_S, (s.end_frame + 1) * HOP_S) for s in d.seg() or ()]


def _centred(segments: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    return [(p, a + PS_CENTRE_S, b + PS_CENTRE_S) for p, a, b in segments]


def recognise(wave: np.ndarray, method: str = "words", seed: int = 0) -> list[tuple[str, float, float]]:
    """Timed phones of real 16 kHz speech: method "words" (recognised words force-aligned to phones)
    or "allphone" (the phone loop); times are the centres of pocketsphinx's analysis windows, so a step
    gets the phone whose frames are centred on it (+12.5 ms raised agreement by 0.02-0.03 on both).
    `seed`: the dither's."""
    x = np.asarray(wave, np.float64)
    rms = np.sqrt(np.mean(x * x)) if x.size else 0.0
    x = (x + 10 ** (DITHER_DB / 20) * rms * np.random.default_rng(seed).standard_normal(x.size)).astype(np.float32)
    if method == "words":
        from stages.sense.lipsync import phones
        return _centred(phones(x))
    if method == "allphone":
        return _centred(allphone(x))
    raise ValueError(f"method is 'words' or 'allphone', not {method!r}")


def block_window(block: int) -> tuple[int, int]:
    """Stream samples [a, b) the front end decodes for `block` (steps block * BLOCK_STEPS ..)."""
    hop = round(HOP_S * SR)
    first = block * BLOCK_STEPS
    return max(0, first - BLOCK_CONTEXT_STEPS) * hop, (first + BLOCK_STEPS + BLOCK_LOOK_STEPS) * hop


def block_phones(x, block: int) -> np.ndarray:
    """[BLOCK_STEPS] phone ids of `block` of a stream (`x`: its samples, ContentTrack's window): the phone
    loop (`recognise` "allphone", dithered with seed `block`) on the block and its context, so a stream's
    phones are the same whatever the chunks it arrives in."""
    a, b = block_window(block)
    wave = x.get(a, b)
    segs = [(p, s + a / SR, e + a / SR) for p, s, e in recognise(wave, "allphone", seed=block)]
    return phone_steps(segs, BLOCK_STEPS, block * BLOCK_STEPS)


def content(wave: np.ndarray, method: str = "words", segments: list[tuple[str, float, float]] | None = None) -> dict:
    """{"phone": [T] ids, "loud": [T]} of 16 kHz speech, T = steps_for(len(wave)); the phones from
    `segments` when given (e.g. the TTS truth), else `recognise(wave, method)`, or method "blocks": the
    streaming front end (ContentTrack without phones: the phone loop on fixed blocks), what a stream of
    `wave` reads."""
    T = steps_for(len(wave))
    if segments is None and method == "blocks":
        phone, loud = ContentTrack().rows(_Samples(np.asarray(wave, np.float32)), T)
        return {"phone": phone[:T], "loud": loud[:T]}
    segs = recognise(wave, method) if segments is None else segments
    phone = phone_steps(segs, T)
    return {"phone": phone, "loud": loudness(wave, phone)}


class ContentStream:
    """The streaming form of a content model's speech rows (models.audio.AudioStream's counterpart for
    audio_encoder "content"): push a stream's samples in order and read the rows of frames [first, first +
    count) (context index: frame p is latent frame p - before), [count, mel_per_latent, CONTENT_DIM], as
    soon as their samples are there; samples past the pushed ones (arrived, not played yet) are passed as
    `ahead`, silence where missing. `phones`: the speech's phones on the stream's timeline (the TTS truth of
    `vidu stream --say`), else the front end's (`block_phones`). Rows that read only pushed samples are
    final; those that read past them are computed on a copy and made again at the next read. Fed the same
    samples, the rows are those of `latent_rows(*content(...).values())` for the whole clip."""

    def __init__(self, cfg, context: tuple[int, int] = (0, 0), phones=None):
        from models.audio import _lead_steps

        self.cfg, self.before = cfg, context[0]
        self.lead = _lead_steps(cfg, self.before)
        self.track = ContentTrack(phones)
        self.x = _Samples(np.zeros(0, np.float32))
        self.step0 = 0                                 # the final rows kept: steps [step0, track.done * FRAME_STEPS)
        self.phone, self.loud = np.zeros(0, np.int64), np.zeros(0, np.float32)

    def push(self, samples) -> None:
        self.x.buf = np.concatenate([self.x.buf, np.asarray(samples, np.float32).reshape(-1)])

    def _frames(self, first: int, count: int) -> tuple[int, int, int]:
        """(first step, end step, video frames whose rows they need)."""
        M = self.cfg.mel_per_latent
        j0, j1 = first * M - self.lead, (first + count) * M - self.lead
        return j0, j1, max(0, -(-j1 // FRAME_STEPS))

    def needed(self, first: int, count: int) -> int:
        """Stream samples (from the clip's sample 0) that frames [first, first + count) read."""
        return self.track.samples_for(self._frames(first, count)[2])

    def features(self, first: int, count: int, ahead=None):
        """[count, mel_per_latent, CONTENT_DIM] torch float32; forgets what frames before `first` read."""
        import torch

        j0, j1, frames = self._frames(first, count)
        if j0 < self.step0 and self.step0 > 0:
            raise ValueError(f"frame {first} was already passed")
        final = self.track.done
        while final < frames and self.track.samples_for(final + 1) <= self.x.end:
            final += 1
        self._keep(*self.track.advance(self.x, final))
        phone, loud = self.phone, self.loud
        if frames > final:                             # rows past the pushed samples: on a copy, from `ahead`
            more = np.zeros(0, np.float32) if ahead is None else np.asarray(ahead, np.float32).reshape(-1)
            seen = _Samples(np.concatenate([self.x.buf, more]), self.x.origin)
            if self.track.phones is None:              # `ahead` is what is pushed next: a block it completes is final
                for b in range(self.track.done * FRAME_STEPS // BLOCK_STEPS, (frames * FRAME_STEPS - 1) // BLOCK_STEPS + 1):
                    if b not in self.track.blocks and block_window(b)[1] <= seen.end:
                        self.track.blocks[b] = block_phones(seen, b)
            track = self.track.fork()
            p, lo = track.advance(seen, frames)
            phone, loud = np.concatenate([phone, p]), np.concatenate([loud, lo])
        phone, loud = np.append(phone, 0), np.append(loud, np.float32(0))     # the last: SIL, for steps outside
        idx = np.arange(j0, j1) - self.step0
        pick = np.where((idx >= 0) & (idx < len(phone) - 1), idx, len(phone) - 1)
        rows = features(phone[pick], loud[pick])
        drop = min(max(0, j0 - self.step0), len(self.phone))   # reads go forward: rows before this one's are done
        self.phone, self.loud, self.step0 = self.phone[drop:], self.loud[drop:], self.step0 + drop
        self._forget()
        return torch.from_numpy(rows).view(count, self.cfg.mel_per_latent, -1)

    def _keep(self, phone: np.ndarray, loud: np.ndarray) -> None:
        self.phone, self.loud = np.concatenate([self.phone, phone]), np.concatenate([self.loud, loud])

    def _forget(self) -> None:
        cut = self.track.forget_before() - self.x.origin
        if cut > 0:
            self.x = _Samples(self.x.buf[cut:], self.x.origin + cut)
        done_block = self.track.done * FRAME_STEPS // BLOCK_STEPS
        for b in [b for b in self.track.blocks if b < done_block]:
            del self.track.blocks[b]

    def state(self) -> dict:
        """Tensors and JSON values (stages/stream/state.py) to continue from."""
        import torch

        t = self.track
        return {"buf": torch.from_numpy(self.x.buf.copy()), "offset": self.x.origin, "step0": self.step0,
                "phone": torch.from_numpy(self.phone.copy()), "loud": torch.from_numpy(self.loud.copy()),
                "track": {"done": t.done, "levels": [[float(v) for v in row] for row in t.levels], "lo": t.lo,
                          "peak": None if t.peak == -np.inf else t.peak, "sums": [float(v) for v in t.sums],
                          "blocks": {str(b): [int(i) for i in v] for b, v in t.blocks.items()}}}

    def load_state(self, st: dict) -> None:
        t, saved = self.track, st["track"]
        self.x = _Samples(np.asarray(st["buf"], np.float32), int(st["offset"]))
        self.step0 = int(st["step0"])
        self.phone, self.loud = np.asarray(st["phone"], np.int64), np.asarray(st["loud"], np.float32)
        t.done, t.levels, t.lo = saved["done"], [np.asarray(r, np.float64) for r in saved["levels"]], saved["lo"]
        t.peak = -np.inf if saved["peak"] is None else saved["peak"]
        t.sums = np.asarray(saved["sums"], np.float64)
        t.blocks = {int(b): np.asarray(v, np.int64) for b, v in saved["blocks"].items()}
