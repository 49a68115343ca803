"""Voice activity with silero-vad (weights ship in the PyPI package; no download)."""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000


def load_vad():
    import torch
    from silero_vad import load_silero_vad

    torch.set_num_threads(1)  # one core per worker; the runner parallelises across items
    return load_silero_vad()


def speech_segments(model, audio: np.ndarray, threshold: float = 0.5, min_speech_ms: int = 250,
                    min_silence_ms: int = 100, pad_ms: int = 30) -> list[tuple[float, float]]:
    """Speech intervals (seconds) of 16 kHz mono float32 audio."""
    import torch
    from silero_vad import get_speech_timestamps

    if audio.size < 512:
        return []
    ts = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), model,
                               threshold=threshold, sampling_rate=SAMPLE_RATE, min_speech_duration_ms=min_speech_ms,
                               min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms)
    return [(t["start"] / SAMPLE_RATE, t["end"] / SAMPLE_RATE) for t in ts]
