"""Speech for the synthetic world, with ground truth: what is said, when, and how the mouth moves.

Sources (all 16 kHz mono float32):
- espeak-ng TTS (`tts`): libespeak-ng and its data ship in the `espeakng-loader` wheel; driven
  through ctypes in synchronous mode, its phoneme events give visemes with timings. `voices`:
  English accents and a few other languages reading English, times ~40 variants (m1..m7, f1..f5,
  named ones), at random rate (120-230 wpm), pitch and pitch range. Speed: ~100 s of audio per CPU
  second, `speak` ~80 (benchmarks/RESULTS.md, 2026-12-01).
- Real recordings cut from folders the caller names (`real_dir`; the product never assumes one):
  utterances are silero-vad regions (every voice in a recording counts as the speaker's), no
  visemes; the mouth follows `causal_loudness`.
- `augment` for all of it: gain, reverb, a synthesised music bed, noise at a random SNR.
Voices, texts and recordings are split "train" / "eval" (`split_items`); eval items never reach
train draws.

The API:
    speak(rng, duration, split="train", real_dir=None, voice=None) -> Speech   one speaker's clip, augmented
    mouth_tracks(speech, T, fps) -> {"mouth": [T], "round": [T]}    visemes when known, else loudness
    causal_loudness(audio, fps, T) -> [T]                           gain-normalised, no future samples
    split_items(split, real_dir=None) -> {"voices", "texts", "files"}
    tts(text, voice, rate, pitch, pitch_range) -> Utterance         one sentence with timed phonemes
    visemes_of(phonemes) / viseme_tracks(visemes, T, fps)           VISEMES: (opening, rounding) targets
    envelope(audio, fps, n_frames) -> [T]                           RMS per video frame over the clip's peak

Check it: `pytest tests/test_synth_speech.py`; measure it: `python benchmarks/synth_speech.py`.
"""
from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import threading
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, fftconvolve, lfilter, resample_poly, sosfilt

from stages.sense.content import mnemonic_core, span_cuts

SR = 16000


def envelope(audio: np.ndarray, fps: float, n_frames: int, sr: int = SR) -> np.ndarray:
    """RMS level per video frame, scaled to [0, 1]."""
    hop = sr / fps
    rms = np.array([np.sqrt(np.mean(audio[int(i * hop):int((i + 1) * hop)] ** 2) + 1e-12) for i in range(n_frames)])
    return np.clip(rms / (rms.max() + 1e-9), 0, 1)


# ---------------------------------------------------------------------------------------------------
# Speech the product will meet: espeak-ng TTS with ground-truth visemes, real recordings, augmentation.

SILENT_SHARE, REAL_SHARE = 0.1, 0.3  # of speak()'s clips; REAL_SHARE only when real_dir has files in the split
REST_ROUND = 0.3  # lip rounding at rest (0 spread ... 1 rounded)
COARTICULATION_S = 0.03  # sigma of the Gaussian that blends viseme targets; it looks 3 sigma = 90 ms ahead
CLOSURE_S = 0.01  # sigma of the bilabial closure's dominance: m/b/p close the lips even when short
RealDirs = str | Path | Sequence[str | Path] | None  # a folder of recordings, or several
REAL_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".mp4", ".mkv", ".mov", ".webm")


@dataclass
class Speech:
    audio: np.ndarray  # [round(duration * SR)] float32, 16 kHz mono
    segments: list[tuple[float, float]]  # utterance intervals, s
    visemes: list[tuple[float, float, str]]  # (start s, end s, viseme name), ground truth; [] when unknown
    source: str  # "tts:<voice>" | "real:<file name>" | "silence" | "formant"
    text: str  # what is said ("" when unknown)
    # (ARPAbet phone, start s, end s), stages.sense.content's phones of the TTS truth; [] when unknown
    phones: list[tuple[str, float, float]] = field(default_factory=list)


Voice = tuple[str, int]  # a character voice: (espeak-ng voice, base pitch 0-100), stages.synth.voice.VOICES


# --- espeak-ng through ctypes (speak_lib.h, API revision 12) ---------------------------------------

ESPEAK_SR = 22050
_SYNCHRONOUS, _PHONEME_EVENTS, _UTF8 = 2, 1, 1  # espeak_AUDIO_OUTPUT, espeak_Initialize option, espeak_Synth flag
_WORD, _PHONEME = 1, 7  # espeak_EVENT_TYPE
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER
# espeak-ng seeds its noise generator (breath, frication, flutter) from the clock at initialisation: the
# same utterance said in another second differed by up to 0.05 of full scale; a fixed seed makes it the same
NOISE_SEED = 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_LOCK = threading.Lock()
_OUT: dict[str, list] = {"samples": [], "events": []}


def _collect(wav, n, events) -> int:
    if wav and n > 0:
        _OUT["samples"].append(np.ctypeslib.as_array(wav, (n,)).copy())
    i = 0
    while events[i].type != 0:
        e = events[i]
        if e.type in (_WORD, _PHONEME):
            name = e.id.string.decode("utf-8", "replace") if e.type == _PHONEME else ""
            _OUT["events"].append((e.type, e.audio_position / 1000, e.text_position, e.length, name))
        i += 1
    return 0


_COLLECT = _CALLBACK(_collect)


@functools.cache
def _espeak_paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as e:
        raise RuntimeError("TTS needs the espeakng-loader wheel (libespeak-ng and its data): pip install espeakng-loader") from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def _synthesize(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, list]:
    """espeak-ng's 22050 Hz int16 samples and its word and phoneme events for `text`.
    The library is loaded, used and unloaded per call: it keeps state across calls (pitch flutter,
    noise generators) that no API resets, and a fresh copy seeded with NOISE_SEED makes each utterance a
    function of its arguments alone (costs ~10 ms)."""
    lib_path, data_path = _espeak_paths()
    with _LOCK:
        lib = ctypes.CDLL(lib_path)
        try:
            if lib.espeak_Initialize(_SYNCHRONOUS, 0, data_path.encode(), _PHONEME_EVENTS) != ESPEAK_SR:
                raise RuntimeError(f"espeak-ng failed to initialise from {data_path}")
            if NOISE_SEED is not None:
                lib.espeak_ng_SetRandSeed(ctypes.c_long(NOISE_SEED))
            lib.espeak_SetSynthCallback(_COLLECT)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
                lib.espeak_SetParameter(param, int(value), 0)
            _OUT["samples"], _OUT["events"] = [], []
            data = text.encode()
            lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, _UTF8, None, None)
            samples, events = _OUT["samples"], _OUT["events"]
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
    return (np.concatenate(samples) if samples else np.zeros(0, np.int16)), events


@dataclass
class Utterance:
    audio: np.ndarray  # float32, 16 kHz mono, as espeak-ng levels it
    phonemes: list[tuple[float, float, str]]  # (start s, end s, espeak mnemonic; pauses start with "_")
    words: list[tuple[float, str]]  # (start s, word)
    span: tuple[float, float]  # speech from the first to the end of the last non-pause phoneme, s


def tts(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> Utterance:
    """`text` spoken by espeak-ng `voice` ("<language>[+<variant>]", e.g. "en-gb-scotland+f2") at
    `rate` words per minute (80-450), base `pitch` 0-100 and `pitch_range` 0-100."""
    variant = voice.partition("+")[2]
    if variant and not (Path(_espeak_paths()[1]) / "voices" / "!v" / variant).is_file():
        raise ValueError(f"espeak-ng has no voice variant {variant!r}")
    raw, events = _synthesize(text, voice, rate, pitch, pitch_range)
    audio = resample_poly(raw.astype(np.float64) / 32768, 320, 441).astype(np.float32)  # 22050 -> 16000 Hz
    end = len(audio) / SR
    ph = [(t, name) for kind, t, _, _, name in events if kind == _PHONEME and not name.startswith("(")]  # "(en)": a language switch
    phonemes = [(t, ph[i + 1][0] if i + 1 < len(ph) else end, name) for i, (t, name) in enumerate(ph)]
    spoken = [(a, b) for a, b, name in phonemes if not name.startswith("_") and b > a]
    words = [(t, text[pos - 1:pos - 1 + n]) for kind, t, pos, n, _ in events if kind == _WORD]
    span = (spoken[0][0], spoken[-1][1]) if spoken else (0.0, 0.0)
    return Utterance(audio, phonemes, words, span)


# --- visemes ----------------------------------------------------------------------------------------

VISEMES: dict[str, tuple[float, float]] = {  # name: (opening 0 closed ... 1 wide, rounding 0 spread ... 1 rounded)
    "sil": (0.0, REST_ROUND),  # pause
    "PP": (0.0, 0.35),  # m b p: lips closed
    "FF": (0.1, 0.2),  # f v: lower lip to upper teeth
    "TH": (0.2, 0.2),  # th: tongue between the teeth
    "DD": (0.25, 0.25),  # t d
    "kk": (0.35, 0.3),  # k g ng h
    "CH": (0.2, 0.75),  # sh zh ch j: protruded
    "SS": (0.1, 0.1),  # s z: teeth together, spread
    "nn": (0.2, 0.25),  # n l
    "RR": (0.25, 0.6),  # r
    "aa": (1.0, 0.3),  # father, cat, cut
    "E": (0.6, 0.15),  # bed, the schwa, bird
    "ih": (0.35, 0.0),  # see, sit, yes: spread
    "oh": (0.7, 0.8),  # law, lot
    "ou": (0.3, 1.0),  # food, foot, w: rounded
}
_PHONEME_VISEMES = {  # espeak mnemonics that the first letter would get wrong; diphthongs are two visemes
    "aI": ("aa", "ih"), "aU": ("aa", "ou"), "eI": ("E", "ih"), "oU": ("oh", "ou"), "OI": ("oh", "ih"),
    "@U": ("E", "ou"), "i@": ("ih", "E"), "i@3": ("ih", "E"), "U@": ("ou", "E"), "e@": ("E",), "tS": ("CH",),
    "dZ": ("CH",), "N": ("kk",), "!": ("kk",), "?": ("kk",), "j": ("ih",), "w": ("ou",), "W": ("ou",), "y": ("ou",), "Y": ("ou",),
}
_FIRST_LETTER = dict(zip("pbmfvBTDtdnlkgNhxqcQszSZrR*jwaAV&eE@3iIyYoO0uU8;",
                         "PP PP PP FF FF FF TH TH DD DD nn nn kk kk kk kk kk kk kk kk SS SS CH CH RR RR RR ih ou aa aa aa "
                         "aa E E E E ih ih ou ou oh oh oh ou ou ou ih".split()))  # B: Spanish beta, Q: gamma, *: tap, 8: Swedish u


def phoneme_visemes(name: str) -> tuple[str, ...]:
    """The viseme(s) of an espeak-ng phoneme mnemonic ("sil" for pauses; unknown ones get "E")."""
    core = mnemonic_core(name)
    if core is None:
        return ("sil",)
    if core in _PHONEME_VISEMES:
        return _PHONEME_VISEMES[core]
    return (_FIRST_LETTER.get(core[0], "E"),)


def visemes_of(phonemes: list[tuple[float, float, str]], offset: float = 0.0) -> list[tuple[float, float, str]]:
    """(start, end, viseme) for timed phonemes, shifted by `offset` s; a diphthong's first viseme
    takes 60 % of it; runs of one viseme are merged."""
    out: list[tuple[float, float, str]] = []
    for a, b, name in phonemes:
        vs = phoneme_visemes(name)
        cuts = span_cuts(a, b, len(vs))
        for s, e, v in zip(cuts, cuts[1:], vs):
            s, e = s + offset, e + offset
            if out and out[-1][2] == v and abs(out[-1][1] - s) < 1e-6:
                out[-1] = (out[-1][0], e, v)
            elif e > s:
                out.append((s, e, v))
    return [(round(s, 4), round(e, 4), v) for s, e, v in out]


def viseme_tracks(visemes: list[tuple[float, float, str]], T: int, fps: float, rate: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Mouth opening and lip rounding per frame (the mean over each frame's interval) from timed
    visemes: targets blended by a Gaussian of sigma COARTICULATION_S (anticipation 3 sigma = 90 ms,
    under the ~100 ms lips lead the sound in speech), opening times (1 - bilabial closure) so m/b/p
    close the lips however short they are."""
    n = int(np.ceil(T / fps * rate)) + 1
    opening, rounding, closed = np.zeros(n), np.full(n, REST_ROUND), np.zeros(n)
    for s, e, v in visemes:
        a, b = round(s * rate), round(e * rate)
        opening[a:b], rounding[a:b] = VISEMES[v]
        closed[a:b] = v == "PP"
    mouth = gaussian_filter1d(opening, COARTICULATION_S * rate, mode="nearest") * (
        1 - gaussian_filter1d(closed, CLOSURE_S * rate, mode="nearest"))
    rounding = gaussian_filter1d(rounding, COARTICULATION_S * rate, mode="nearest")
    edges = np.minimum(np.round(np.arange(T + 1) * rate / fps).astype(int), n - 1)
    return _frame_means(mouth, edges), _frame_means(rounding, edges)


def _frame_means(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(x)])
    width = np.maximum(edges[1:] - edges[:-1], 1)
    return np.clip((c[edges[:-1] + width] - c[edges[:-1]]) / width, 0, 1)


def causal_loudness(audio: np.ndarray, fps: float, T: int, sr: int = SR, range_db: float = 30.0,
                    attack_s: float = 0.02, release_db_s: float = 6.0, floor_db: float = -55.0) -> np.ndarray:
    """Mouth opening per frame from loudness alone, causally: frame i reads samples up to the end of
    frame i and nothing later. The 300-3000 Hz level (dB, causal IIR band-pass) is normalised by a
    running reference (an AGC): it rises towards louder frames with time constant `attack_s` and
    falls `release_db_s` dB per second, never below `floor_db` (the AGC's most gain: speech from
    -55 dBFS up is normalised); opening = level within `range_db` under the reference, in [0, 1].
    Scaling the audio shifts level and reference alike. Noise alone opens it too: mask by segments."""
    x = sosfilt(butter(2, [300, 3000], "bandpass", fs=sr, output="sos"), np.asarray(audio, np.float64))
    edges = np.round(np.arange(T + 1) * sr / fps).astype(int)
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    a, b = np.minimum(edges[:-1], len(x)), np.minimum(edges[1:], len(x))
    level = 10 * np.log10((c[b] - c[a]) / np.maximum(b - a, 1) + 1e-12)
    level[b <= a] = floor_db
    up, down = 1 - np.exp(-1 / (fps * attack_s)), release_db_s / fps
    out, ref = np.zeros(T), floor_db
    for i in range(T):
        ref = ref + up * (level[i] - ref) if level[i] > ref else max(ref - down, floor_db)
        out[i] = (level[i] - ref + range_db) / range_db
    return np.clip(out, 0, 1)


def mouth_tracks(speech: Speech, T: int, fps: float) -> dict[str, np.ndarray]:
    """{"mouth": [T] opening 0..1, "round": [T] rounding 0..1} for `speech`: from the visemes when
    known, else `causal_loudness` with rest rounding; closed (and at rest) outside the segments."""
    if speech.visemes:
        mouth, rounding = viseme_tracks(speech.visemes, T, fps)
    else:
        mouth, rounding = causal_loudness(speech.audio, fps, T), np.full(T, REST_ROUND)
    talking = _talking(speech.segments, T, fps)
    return {"mouth": np.where(talking, mouth, 0.0).astype(np.float32),
            "round": np.where(talking, rounding, REST_ROUND).astype(np.float32)}


def _talking(segments: list[tuple[float, float]], T: int, fps: float) -> np.ndarray:
    centre = (np.arange(T) + 0.5) / fps
    talking = np.zeros(T, bool)
    for s, e in segments:
        talking |= (centre >= s) & (centre < e)
    return talking


# --- voices, texts, recordings and their train / eval split ----------------------------------------

ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-029"]
READERS = ["de", "fr", "es", "it", "nl", "pt-br", "pl", "sv"]  # other languages reading English: accented speech
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie",
            "anika", "aunty", "belinda", "grandma", "linda", "steph", "adam", "Andy", "benjamin", "caleb", "david",
            "edward", "ian", "john", "max", "Michael", "norbert", "paul", "quincy", "rob", "robert", "travis",
            "victor", "zac", "klatt", "klatt2", "klatt3"]
EVAL_LANGUAGES = {"en-029", "nl"}
EVAL_VARIANTS = {"m3", "f4", "belinda", "john", "travis", "klatt3"}
READER_SHARE = 0.15  # of TTS clips, a non-English voice


def voices(split: str) -> list[str]:
    """espeak-ng voices "<language>+<variant>" of a split: a voice is held out for "eval" when its
    language or its variant is, so no eval accent or variant is ever heard in "train"."""
    _check(split)
    return [f"{lang}+{v}" for lang in ACCENTS + READERS for v in VARIANTS
            if ((lang in EVAL_LANGUAGES) or (v in EVAL_VARIANTS)) == (split == "eval")]


def _held_out(name: str, every: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % every == 0


INSTRUCTIONS = ["blink", "nod", "smile", "raise a hand", "turn left", "turn right", "shake your head", "look up",
                "look down", "wave", "open your mouth", "close your eyes"]
_W = {
    "name": "Anna Ben Carla David Emma Frank Grace Hugo Iris Jack Kate Leo Maria Nick Olga Paul Rosa Sam Tom Vera".split(),
    "thing": ("the book|the window|the coffee|a letter|the garden|the music|my phone|the train|a new bike|the map|"
              "the kitchen|some bread|the report|the blue door|a small boat|the old piano|the movie|the weather").split("|"),
    "place": ("to the market|to the station|home|to the beach|to work|to the park|upstairs|to the library|"
              "back to school|into town|across the bridge|to the mountains").split("|"),
    "time": ("today|tomorrow|last night|this morning|on Sunday|at noon|after lunch|every day|next week|"
             "in the evening|right now|before dinner").split("|"),
    "verb": "likes|needs|found|opened|cleaned|forgot|bought|fixed|painted|moved|shared|watched".split("|"),
    "adj": "quiet|bright|cold|lovely|strange|busy|warm|simple|heavy|beautiful|noisy|perfect".split("|"),
    "go": "walked|drove|went|ran|hurried|cycled".split("|"),
}
_TEMPLATES = [
    "{name} {verb} {thing} {time}.", "We {go} {place} {time}.", "Did {name} really find {thing}?",
    "I think {thing} looks {adj}.", "{name} and {name2} {go} {place}.", "Please bring {thing} {place}.",
    "It was a {adj} day, so we {go} {place}.", "Why is {thing} so {adj} {time}?", "{name} said hello to {name2}.",
    "Could you check {thing} for me?", "The room was {adj} and {adj2}.", "My friend {verb} {thing}.",
    "Let us meet {time} and talk about {thing}.", "Honestly, {thing} is {adj}.", "Where did you put {thing}?",
    "Please {action}.", "Now {action}, then {action2}.", "Can you {action} for me?", "Okay, {action} now.",
    "When I say so, {action}.", "{name}, please {action} {time}.",
]


@functools.cache
def _texts() -> tuple[str, ...]:
    """A few hundred short English sentences from templates and word lists (seeded: always the
    same list); about one in four carries an instruction ("raise a hand", "turn left", ...)."""
    rng = np.random.default_rng(20261201)
    out: dict[str, None] = {}
    while len(out) < 400:
        t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        pick = {k: v[rng.integers(len(v))] for k, v in _W.items()}
        pick |= {"name2": _W["name"][rng.integers(len(_W["name"]))], "adj2": _W["adj"][rng.integers(len(_W["adj"]))],
                 "action": INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))],
                 "action2": INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]}
        if pick["adj2"] == pick["adj"] or pick["name2"] == pick["name"] or pick["action2"] == pick["action"]:
            continue
        s = t.format(**pick)
        out[s[0].upper() + s[1:]] = None
    return tuple(out)


def texts(split: str) -> list[str]:
    """The built-in sentences of a split: one in five (by SHA-1 of the sentence) is held out."""
    _check(split)
    return [t for t in _texts() if _held_out(t, 5) == (split == "eval")]


def real_files(real_dir: RealDirs, split: str) -> list[Path]:
    """Recordings (audio, or video with an audio track) of a split directly in `real_dir` (a folder
    or a list of folders; missing ones are skipped): one in three, by SHA-1 of the file name, is
    held out for "eval"."""
    _check(split)
    dirs = [] if real_dir is None else [real_dir] if isinstance(real_dir, (str, Path)) else list(real_dir)
    files = sorted((p for d in dirs if Path(d).is_dir() for p in Path(d).iterdir()
                    if p.suffix.lower() in REAL_EXTS and p.is_file()), key=lambda p: (p.name, str(p)))
    return [p for p in files if _held_out(p.name, 3) == (split == "eval")]


def split_items(split: str, real_dir: RealDirs = None) -> dict[str, list[str]]:
    """What belongs to a split: {"voices": [...], "texts": [...], "files": [file names]}."""
    return {"voices": voices(split), "texts": texts(split), "files": [p.name for p in real_files(real_dir, split)]}


def _check(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")


# --- augmentation -----------------------------------------------------------------------------------

def _power(x: np.ndarray, segments: list[tuple[float, float]] | None = None) -> float:
    if segments:
        parts = [x[int(s * SR):int(e * SR)] for s, e in segments]
        x = np.concatenate(parts) if parts else x
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def colored_noise(rng: np.random.Generator, n: int, color: str = "white") -> np.ndarray:
    """`n` samples of unit-RMS noise: "white", "pink" (-3 dB/octave) or "brown" (-6 dB/octave),
    shaped in the frequency domain over the next fast FFT length (zero-padded, then cut to n; the same
    as over n where n is fast already: an hour of speech, 57,600,640 samples, took 66 s over n, 8 s)."""
    noise = rng.standard_normal(n)
    if color != "white":
        from scipy.fft import next_fast_len
        m = next_fast_len(n, real=True)
        spectrum = np.fft.rfft(noise, m)
        f = np.maximum(np.fft.rfftfreq(m, 1 / SR), 20.0)
        noise = np.fft.irfft(spectrum / (f ** (0.5 if color == "pink" else 1.0)), m)[:n]
    return noise / (np.sqrt(np.mean(noise ** 2)) + 1e-20)


def add_noise(rng: np.random.Generator, audio: np.ndarray, snr_db: float,
              segments: list[tuple[float, float]] | None = None, color: str = "white") -> np.ndarray:
    """`audio` plus `colored_noise` exactly `snr_db` under its power (within `segments` when given)."""
    noise = colored_noise(rng, len(audio), color) * np.sqrt(_power(audio, segments) / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def reverb(rng: np.random.Generator, audio: np.ndarray, rt60: float, wet: float = 0.4) -> np.ndarray:
    """A synthetic room: the dry sound plus `wet` times its convolution with an exponentially
    decaying noise impulse response (-60 dB after `rt60` s, unit energy)."""
    t = np.arange(int(rt60 * SR)) / SR
    ir = rng.standard_normal(len(t)) * np.exp(-6.908 * t / rt60)
    ir /= np.sqrt(np.sum(ir ** 2))
    return (audio + wet * fftconvolve(audio, ir)[:len(audio)]).astype(np.float32)


def music_bed(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` samples of synthesised music at unit RMS: a four-chord progression (triads with a few
    harmonics and a bass line), kick, snare and hi-hat at 80-140 bpm."""
    beat = 60 / rng.uniform(80, 140)
    t = np.arange(n) / SR
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    scale = [0, 2, 4, 5, 7, 9, 11]
    chords = [rng.integers(0, 7) for _ in range(4)]
    out = np.zeros(n)
    bar = np.floor(t / (4 * beat)).astype(int) % 4
    for k, degree in enumerate(chords):
        on = bar == k
        for third in range(3):
            step = degree + 2 * third
            f = root * 2 ** ((scale[step % 7] + 12 * (step // 7)) / 12) * 2
            out[on] += sum(np.sin(2 * np.pi * f * h * t[on]) / h ** 1.5 for h in (1, 2, 3))
        out[on] += 1.5 * np.sin(2 * np.pi * root * 2 ** (scale[degree] / 12) / 2 * t[on])
    out *= 0.6 + 0.4 * np.exp(-(t % beat) / 0.3)
    phase = t % beat
    kick_on = (np.floor(t / beat) % 2) == 0
    out += 4 * kick_on * np.sin(2 * np.pi * (50 + 100 * np.exp(-phase / 0.03)) * phase) * np.exp(-phase / 0.12)
    noise = rng.standard_normal(n)
    out += 2 * (~kick_on) * lfilter([1, -1], [1], noise) * np.exp(-phase / 0.08)
    out += 0.5 * np.diff(noise, prepend=0) * np.exp(-(t % (beat / 2)) / 0.02)
    return (out / (np.sqrt(np.mean(out ** 2)) + 1e-12)).astype(np.float32)


def augment(rng: np.random.Generator, audio: np.ndarray, segments: list[tuple[float, float]]) -> np.ndarray:
    """Speech as a microphone might hear it: a room (30 %: RT60 0.2-0.9 s), a music bed (20 %:
    3-20 dB under the speech), noise (70 %: white, pink or brown at 0-30 dB SNR), a level of
    -38 to -14 dBFS RMS for the speech (peaks kept under full scale) and a -80 dBFS noise floor."""
    speech_power = _power(audio, segments) if segments else 0.01
    if rng.random() < 0.3:
        audio = reverb(rng, audio, rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.7))
    if rng.random() < 0.2:
        audio = audio + music_bed(rng, len(audio)) * np.sqrt(speech_power / 10 ** (rng.uniform(3, 20) / 10))
    if rng.random() < 0.7:
        color, snr = ["white", "pink", "brown"][rng.integers(3)], rng.uniform(0, 30)
        audio = audio + colored_noise(rng, len(audio), color) * np.sqrt(speech_power / 10 ** (snr / 10))
    gain = 10 ** (rng.uniform(-38, -14) / 20) / np.sqrt(max(speech_power, 1e-12))
    audio = audio * min(gain, 0.98 / (np.abs(audio).max() + 1e-9))
    return (audio + 1e-4 * rng.standard_normal(len(audio))).astype(np.float32)


# --- the clips --------------------------------------------------------------------------------------

def _tts_clip(rng: np.random.Generator, n: int, split: str, voice: Voice | None = None):
    from stages.sense.content import from_espeak
    if voice is None:
        pool = voices(split)
        readers = [v for v in pool if v.split("+")[0] in READERS]
        english = [v for v in pool if v.split("+")[0] not in READERS]
        group = readers if rng.random() < READER_SHARE else english
        name = group[rng.integers(len(group))]
        rate, pitch, pitch_range = int(rng.integers(120, 231)), int(rng.integers(20, 81)), int(rng.integers(20, 91))
    else:
        (name, pitch), rate, pitch_range = voice, int(rng.integers(120, 231)), int(rng.integers(20, 91))
    candidates = texts(split)
    audio, segments, vis, phones, said = np.zeros(n, np.float32), [], [], [], []
    duration = n / SR
    t, misses = rng.uniform(0.05, min(0.8, 0.3 * duration)), 0
    while t < duration - 0.5 and misses < 4:
        text = candidates[rng.integers(len(candidates))]
        u = tts(text, name, rate, pitch, pitch_range)
        s0, s1 = u.span
        if s1 <= s0 or t + (s1 - s0) > duration - 0.05:
            misses += 1
            continue
        offset = t - s0
        start = round(offset * SR)
        src = u.audio[max(0, -start):]
        dst = audio[max(0, start):]
        m = min(len(src), len(dst))
        dst[:m] += src[:m]
        segments.append((round(t, 4), round(t + s1 - s0, 4)))
        vis += [(max(a, 0.0), min(b, duration), v) for a, b, v in visemes_of(u.phonemes, offset)
                if b > 0 and a < duration and (v != "sil" or segments[-1][0] <= a < segments[-1][1])]
        phones += [(p, max(a, 0.0), min(b, duration)) for p, a, b in from_espeak(u.phonemes, offset) if b > 0 and a < duration]
        said.append(text)
        t += (s1 - s0) + rng.uniform(0.3, 1.2)
    return audio, segments, vis, f"tts:{name}", " ".join(said), phones


@functools.cache
def _vad():
    from stages.sense.speech import load_vad
    return load_vad()


@functools.lru_cache(maxsize=32)
def _recording(path: str, mtime: float) -> tuple[np.ndarray, tuple[tuple[float, float], ...]]:
    from stages.sense.media import load_audio
    from stages.sense.speech import speech_segments
    audio = load_audio(path, SR)
    return audio, tuple(speech_segments(_vad(), audio))


def _real_clip(rng: np.random.Generator, n: int, files: list[Path]):
    path = files[rng.integers(len(files))]
    rec, regions = _recording(str(path), path.stat().st_mtime)
    audio = np.zeros(n, np.float32)
    if not regions:
        return audio, [], [], f"real:{path.name}", ""
    duration = n / SR
    lead = rng.uniform(0.0, min(0.8, 0.3 * duration))
    src0 = max(0.0, regions[rng.integers(len(regions))][0] - 0.1)  # the cut opens 100 ms before an utterance
    shift = lead - src0
    a = round(src0 * SR)
    piece = rec[a:a + n - round(lead * SR)]
    b = round(lead * SR)
    audio[b:b + len(piece)] = piece
    end = min(duration, lead + len(piece) / SR)
    segments = [(round(max(s + shift, lead), 4), round(min(e + shift, end), 4)) for s, e in regions
                if e + shift > lead and s + shift < end]
    return audio, [(s, e) for s, e in segments if e - s > 0.05], [], f"real:{path.name}", ""


def speak(rng: np.random.Generator, duration: float, split: str = "train", real_dir: RealDirs = None,
          voice: Voice | None = None) -> Speech:
    """A clip of one speaker, `duration` s: SILENT_SHARE silent clips; REAL_SHARE cut from the
    recordings of `split` in `real_dir` (when it has some); otherwise TTS sentences of `split`
    in one voice of `split` with 0.3-1.2 s pauses. All augmented (`augment`); visemes and phones are the
    TTS ground truth, [] for real speech. `voice`: a character's voice (the joint model's target): TTS
    in that voice alone (no recordings), as it sounds (not augmented)."""
    _check(split)
    n = round(duration * SR)
    files = real_files(real_dir, split) if voice is None else []
    r = rng.random()
    phones = []
    if r < SILENT_SHARE or duration < 0.8:
        audio, segments, vis, source, text = np.zeros(n, np.float32), [], [], "silence", ""
    elif files and r < SILENT_SHARE + REAL_SHARE:
        audio, segments, vis, source, text = _real_clip(rng, n, files)
    else:
        audio, segments, vis, source, text, phones = _tts_clip(rng, n, split, voice)
    return Speech(augment(rng, audio, segments) if voice is None else audio, segments, vis, source, text, phones)