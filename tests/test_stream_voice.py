"""`--audio-out generated`: a stream's joint audio plays through one stream of the shipped vocoder
(models.vocoder.ChunkVoice), not a Griffin-Lim of each chunk alone. The tiny preset (random weights, joint
audio on): the chunks' samples joined are the vocoder's whole-clip synthesis of their log-mel (16 ms late),
each chunk as long as its frames, and a stream stopped and resumed through its saved state continues the
vocoder's stream exactly; synthesizing a chunk alone, or resuming without the vocoder's state, does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import write_face

SR, FPS = 16000, 25


class Spy:
    """The session's ChunkVoice, recording the latents it is given."""

    def __init__(self, voice):
        self.voice, self.lats = voice, []

    def __call__(self, lat, first):
        self.lats.append((lat.clone(), first))
        return self.voice(lat, first)

    def state(self):
        return self.voice.state()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("voice")
    write_face(d / "face.png")
    t = np.arange(3 * SR) / SR
    speech = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return {"dir": d, "face": d / "face.png", "speech": speech}


def session(inputs, resume=None):
    from stages.stream.events import AudioChunk, AudioEnd, EventQueue
    from stages.stream.session import Session, SessionOptions, load_parts
    events = EventQueue()
    events.put(AudioChunk(inputs["speech"][resume["audio_samples"] if resume else 0:]))
    events.put(AudioEnd())
    return Session(load_parts(inputs["face"], seed=0), events, SessionOptions(audio_out="generated"), resume=resume)


def test_generated_audio_is_one_vocoder_stream_and_resumes(inputs):
    from models.audio import latent_to_logmel
    from models.vocoder import load
    from stages.stream.state import read_state, write_state

    whole = session(inputs)
    whole.voice = spy = Spy(whole._voice())
    chunks = [whole.next_chunk() for _ in range(3)]
    audio = [c[1] for c in chunks]
    assert [len(a) for a in audio] == [c[0].shape[0] * SR // FPS for c in chunks]   # each chunk as long as its frames
    lag = load().cfg.n_fft // 2
    assert not audio[0][:lag].any()                                                # the vocoder's lag, paid once
    cfg = whole.p.cfg.audio
    mels = [latent_to_logmel(lat, cfg, first) for lat, first in spy.lats]
    joined = np.concatenate(audio)[lag:]
    oracle = load().synthesize(torch.cat(mels)).numpy()[:len(joined)]
    assert np.abs(joined - oracle).max() < 1e-4 * max(1.0, np.abs(oracle).max())
    alone = load().synthesize(mels[1]).numpy()                                     # control: chunk 2 without its past
    start = len(audio[0]) - lag
    assert np.abs(alone[:lag] - joined[start:start + lag]).max() > 1e-3

    cut = session(inputs)
    for _ in range(2):
        cut.next_chunk()
    path = write_state(inputs["dir"] / "voice.state", cut.suspend(), {})
    state, _ = read_state(path)
    assert "voice.steps" in state
    resumed = session(inputs, resume=state).next_chunk()[1]
    np.testing.assert_allclose(resumed, audio[2], atol=1e-6)
    fresh = session(inputs, resume={k: v for k, v in state.items() if not k.startswith("voice.")}).next_chunk()[1]
    assert len(fresh) == len(audio[2]) and np.abs(fresh - audio[2]).max() > 1e-3  # control: no vocoder state
