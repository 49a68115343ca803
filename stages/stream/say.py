"""Typed text spoken offline (espeak-ng, through stages/synth/speech.py's `tts`) as a stream's speech.

    samples = speech("hello there", "en-gb-x-rp+m2")     # 16 kHz mono float32; StreamError (one line)

`vidu stream --say TEXT` feeds `speech(TEXT, voice)` through io.open_samples, as an --audio file's
samples are fed (paced with --realtime, then AudioEnd); the page's "say" toggle (a "say" message on the data
channel: stages/serve/sessions.py) puts the speech on the queue at once, as push-to-talk audio arrives.

The speech drives the lips and is the audio track exactly as a file with those samples would.
A voice is a character voice (stages/synth/voice.py VOICES: ada, bea, ben, ... an espeak-ng voice and a base
pitch; the voices the page offers and `vidu eval --voice` scores) or an espeak-ng voice
"<language>[+<variant>]": a file name under espeak-ng-data/lang/ (en-us, en-gb-x-rp, de, ...) and optionally
one under espeak-ng-data/voices/!v/ (m1..m7, f1..f5, klatt, ...), at base pitch 50.
"""
from __future__ import annotations

import numpy as np

from stages.stream.events import StreamError

DEFAULT_VOICE = "en-us"


def _voice_help() -> str:
    where = "the files under espeak-ng-data/lang/ and espeak-ng-data/voices/!v/"
    try:
        from stages.synth.speech import _espeak_paths
        where = f"the files under {_espeak_paths()[1]}/lang/ (languages) and voices/!v/ (variants)"
    except RuntimeError:
        pass
    from stages.synth.voice import VOICES
    return (f"a voice is a character voice ({', '.join(sorted(VOICES))}) or LANGUAGE[+VARIANT], e.g. en-us, en-us+f3, "
            f"en-gb-x-rp+m2; valid names are {where}")


def espeak_voice(voice: str) -> tuple[str, int]:
    """(espeak-ng voice, base pitch 0-100) of `voice`: a character voice's own, else `voice` itself at 50."""
    from stages.synth.voice import VOICES
    return VOICES.get(voice, (voice, 50))


def speech(text: str, voice: str = DEFAULT_VOICE) -> np.ndarray:
    """`text` spoken in `voice` (a character voice or an espeak-ng one): [N] float32 at 16 kHz (what
    `tts(text, *espeak_voice(voice))` gives).
    StreamError, one line, for empty text, an unknown voice or a missing espeak-ng."""
    return said(text, voice)[0]


def said(text: str, voice: str = DEFAULT_VOICE) -> tuple[np.ndarray, list]:
    """`speech(text, voice)` and its phones, espeak-ng's truth: (ARPAbet phone, start s, end s) on the
    speech's timeline (stages.sense.content.from_espeak; what a content model hears of it)."""
    from stages.sense.content import from_espeak
    text = (text or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
    if not text:
        raise StreamError("nothing to say: the text is empty")
    from stages.synth.speech import tts
    espeak, pitch = espeak_voice(voice or "")
    try:
        u = tts(text, espeak, pitch=pitch)
    except ValueError as e:                      # espeak-ng has no voice (variant) ...
        raise StreamError(f"unknown voice {voice!r} ({e}); {_voice_help()}") from None
    except RuntimeError as e:                    # the espeakng-loader wheel is missing
        raise StreamError(str(e).splitlines()[0]) from None
    return np.asarray(u.audio, np.float32).reshape(-1), from_espeak(u.phonemes)


def check_voice(voice: str) -> None:
    """StreamError now (before a model loads) if `voice` is not one espeak-ng has."""
    speech(".", voice)
