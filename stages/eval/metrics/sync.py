"""Lip sync.

SyncNet protocol (Chung & Zisserman 2016; syncnet_python): video at 25 fps, audio at 16 kHz, 0.2 s
MFCC windows against 5-frame mouth crops, offsets searched over +-15 frames; Sync-D = mean embedding
distance at the best offset, Sync-C = median - min of the distance curve. With local SyncNet weights
(`--syncnet PATH`: the official syncnet_v2.model state dict) that protocol is run, `sync_method` =
"syncnet" (stages/eval/metrics/syncnet.py: network, inputs, offset sign and the deviations from the
reference, e.g. dlib face boxes instead of S3FD); a missing file or one that is not a SyncNet state
dict is refused with one line.

Default: an offline proxy with the same output fields, `sync_method` = PROXY (never Sync-C / Sync-D):
the measured lip aperture against the aperture the spoken phones predict.
- speech -> phones: pocketsphinx (the wheel ships its en-us acoustic model, language model and
  CMUdict) recognises the words, then force-aligns them to phones (10 ms frames); where the phone pass
  fails, a word's dictionary phones share its span equally. Each phone sets an aperture target
  (OPENNESS: bilabials m b p closed, f v nearly, vowels by height, other consonants 0.35, silence
  0.1), smoothed by a 40 ms Gaussian (coarticulation) and read at the frame times t / 25 s;
- mouth: outer-lip height (dlib's 68 points 50-52 against 58-56, stages/sense/mouth.py at 25 fps)
  over the distance between the eye centres;
- both tracks lose their slow trend (minus a Gaussian of sigma 6 frames: pauses and posture count
  less than syllables), then at each lag k in -15..15 frames (mouth frame t against speech frame
  t + k: positive k = audio late) the Pearson r(k) over the same frames t in [15, T - 15) that show
  a face. Nothing is fitted, so no lag is favoured by fitting;
- `sync_offset_frames` = argmax r, `sync_confidence` = max r - median r, `sync_distance` = 2 (1 - max r):
  the mean squared difference of the standardised tracks at the best offset (0 = locked, lower is
  better). `sync_curve` keeps r(k).
Needs T >= 55 frames (2.2 s) with a face in 25 of the fitted frames, and recognised speech; else the
fields are None. A long video scored in pieces (stages/eval/video.py) averages the pieces' r curves
(`sync_pieces`). The estimator's code is stages/sense/lipsync.py (imported here; `vidu diarize` measures
each clip's A/V offset with it). Costs about one second of CPU per second of audio (the word search); the phone
model is English, so other languages give rougher phones (timings still follow the sound).

Measured with benchmarks/sync_proxy.py (the `vidu eval` path: 25 fps grid, analysis size 320) on the
five retalking clips (../shared/media/talking, 5-6.6 s); offset / confidence / distance, and the
offsets of the derived shapes against their own audio:

    clip  own audio         audio +0.5 s   next clip's audio   portrait 9:16  1080p  30 fps
    1     -1  0.56  0.97    +11            +3   0.17  1.64     -2             -2     -2
    2     +1  0.42  1.07    +14             0   0.30  1.45     +1             +1      0
    3     +1  0.77  0.70    +13            -10  0.30  1.31     +1             +1      0
    4      0  0.41  1.25    +12            +15  0.30  1.47      0              0     -1
    5      0  0.46  1.05    +12            -4   0.39  1.20     -1              0     -1

Own audio: |offset| <= 1 on all five. The 0.5 s delay (12.5 frames) moves the peak by 12 or 13 on all
five, so it reads 12-13 where the own offset reads 0 or +1 (clips 3-5), and 11 / 14 on clips 1 / 2:
searched in 10 ms steps, those two sit at -1.5 / +1.25 frames (delayed +11.25 / +13.5); the five
shifts measure 12.25-12.75 frames, so what is off there is the clip (or the proxy's reading of that
speaker), not the lag search. Derived shapes: within 1 frame of the original on all 15; clip 1's
-1.5 rounds to -2 in all three. Every clip's video against each of the 4 other clips' audio (20
pairs): confidence lower and distance higher than with its own audio in 20 of 20, though by as little
as 0.03 in confidence (clip 5's video with clip 4's audio: 0.43 vs 0.46; distance 1.19 vs 1.05).
Measured and rejected (all five clips x own / delayed / next clip's audio): the previous
canonical-correlation proxy (lip shape vs log-mel, a CCA fitted per lag: own within +-1 on 2 of 5,
delayed 12-13 on 3, foreign confidence lower on 4); inner-lip gap against 300-3000 Hz log energy, raw,
as velocities or band-passed 1-8 Hz (own within +-1 on at most 2); pocketsphinx's phone loop without
words (2 of 5); the recognised phones against the inner-lip gap without trend removal (own 5, delayed
4, foreign lower 3); trend sigma 10 or 15 frames instead of 6 (own 4-5, foreign lower 3-4).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.eval.metrics import EvalError
# the proxy estimator itself (one implementation, shared with vidu diarize's A/V offset)
from stages.sense.lipsync import (  # noqa: F401
    PROXY, MAX_OFFSET, MIN_FRAMES, PHONE_HOP, COARTICULATION, HIGHPASS,
    UPPER_OUTER, LOWER_OUTER, OPENNESS, CONSONANT, REST, lip_aperture,
    decoder, phones, phone_track, highpass, lag_curve, sync_curve,
    sync_fields)


def check_syncnet(path: str | Path) -> None:
    """Load (and cache) the SyncNet weights at `path`: EvalError when missing or not a SyncNet state dict."""
    from stages.eval.metrics import syncnet

    syncnet.load(path)


def score_sync(landmarks: np.ndarray, wave: np.ndarray | None, syncnet: str | None = None,
               frames: np.ndarray | None = None, boxes: list | None = None) -> dict:
    """The sync fields of one contiguous video from its face track's landmarks ([T, 68, 2] at 25 fps,
    nan: no face) and its 16 kHz wave. With `syncnet` (weights file): SyncNet on crops of the RGB
    `frames` [T, H, W, 3] uint8 around the track's `boxes` (per frame, in those frames' pixels)."""
    if syncnet:
        from stages.eval.metrics import syncnet as syncnet_m

        if frames is None or boxes is None:
            raise EvalError("SyncNet scoring needs the frames and their face boxes")
        net = syncnet_m.load(syncnet)
        return syncnet_m.sync_fields([syncnet_m.run_curve(net, boxes, frames.shape[2],
                                                          lambda a, n: frames[a:a + n], wave)])
    return sync_fields([sync_curve(landmarks, wave)])
