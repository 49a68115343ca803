"""Audio aligned to latent frames: conditioning features and the joint-branch audio latent.

Timeline: latent frame i covers video frames 4i-3 .. 4i (latent 0 covers frame 0 and three frames of
silence before it), i.e. `mel_per_latent` = 16 log-mel steps of 10 ms at 16 kHz / 25 fps. A model
hears, for each latent frame, the features of `context_before` frames before it and `context_after`
after it (AudioConfig), so `audio_features` of F frames has F + context_before + context_after rows.
One function frames the log-mel (`frame_logmel`), offline (`audio_features`) and streaming
(`AudioStream`), so a clip streamed chunk by chunk gets exactly its training features; wav2vec2
hidden states (resampled to the mel rate) go through `per_latent`.

The joint audio latent (x = [v; a], eq. 1 of the paper) is the normalised log-mel of each latent
frame split into `tokens` groups of consecutive steps; `to_waveform` goes back with Griffin-Lim, and
models.vocoder (our own, shipped) streams it back chunk by chunk without seams.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config import AudioConfig

LOG_FLOOR = math.log(1e-5)
LOGMEL_CENTER, LOGMEL_SCALE = -4.0, 4.0   # fixed affine map of natural-log mel to roughly [-2, 2]


@lru_cache(maxsize=4)
def _mel(cfg: AudioConfig):
    from torchaudio.transforms import MelSpectrogram
    return MelSpectrogram(cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop,
                          n_mels=cfg.n_mels, center=False, power=2.0)


def latent_frames_for(samples: int, cfg: AudioConfig = AudioConfig()) -> int:
    """How many latent frames a clip of `samples` audio samples spans (1 + 4k video frames)."""
    video_frames = max(1, math.floor(samples / cfg.sample_rate * cfg.fps))
    return 1 + (video_frames - 1) // cfg.video_frames_per_latent


def _lead_steps(cfg: AudioConfig, before: int) -> int:
    """Mel steps from the first feature step to the clip's sample 0: `before` context frames, and latent
    frame 0 starting 3 video frames before video frame 0."""
    return before * cfg.mel_per_latent + cfg.mel_per_latent - cfg.mel_per_video_frame


def lookahead_ms(cfg: AudioConfig, context: tuple[int, int]) -> float:
    """How far past the end of the last latent frame a model call generates its speech features reach."""
    return 1000 * (context[1] * cfg.samples_per_latent + cfg.n_fft // 2 - cfg.hop) / cfg.sample_rate


def pad_left(cfg: AudioConfig, before: int) -> int:
    """Zeros before a clip's sample 0 in the padded stream that `frame_logmel` frames: step j of the
    features is centred on clip sample (j - lead) * hop, its window starts n_fft / 2 earlier."""
    return _lead_steps(cfg, before) * cfg.hop + cfg.n_fft // 2


def frame_logmel(padded: torch.Tensor, count: int, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """THE speech feature function, offline and streaming: normalised log-mel of `count` consecutive
    latent frames, [count, mel_per_latent, n_mels], from a sample stream whose sample 0 starts the first
    frame's first STFT window (zeros past its end). Each latent frame is framed from its own slice, so
    any split of a clip into pieces gives the same numbers."""
    M, hop = cfg.mel_per_latent, cfg.hop
    span = (M - 1) * hop + cfg.n_fft
    need = (count - 1) * M * hop + span
    x = padded.float()[:need]
    x = torch.nn.functional.pad(x, (0, need - x.shape[0]))
    pieces = x.unfold(0, span, M * hop)                                  # [count, span]
    m = _mel(cfg)(pieces).clamp_min(1e-5).log().transpose(1, 2)          # [count, M, n_mels]
    return (m - LOGMEL_CENTER) / LOGMEL_SCALE


def per_latent(steps: torch.Tensor, n_latent: int, cfg: AudioConfig = AudioConfig(), pad_value: float = 0.0,
               before: int = 0) -> torch.Tensor:
    """steps: [T, D] features at the mel rate (step j centred at clip sample j * hop) -> [n_latent, M, D]
    on the latent timeline starting `before` frames early; missing steps are `pad_value`."""
    M = cfg.mel_per_latent
    lead = _lead_steps(cfg, before)
    need = n_latent * M
    body = steps[: need - lead]
    out = torch.full((need, steps.shape[1]), pad_value, dtype=steps.dtype, device=steps.device)
    out[lead: lead + body.shape[0]] = body
    return out.view(n_latent, M, -1)


def check_wave_speech(model_cfg) -> None:
    """A model that hears waves (log-mel or wav2vec2 features of any speech), or a one-line error: a content
    model (audio_encoder "content", issue 19) reads phones and loudness, which the synthetic world's TTS
    truth gives in training and distillation and `vidu stream`'s ContentStream (stages.sense.content) while
    streaming; real clips and the synth bench's wave sampler read waves."""
    if model_cfg.audio_encoder == "content":
        raise ValueError(f"preset {model_cfg.name} reads speech content (phones and loudness), not the wave: it "
                         f"trains and distills on the synthetic world's TTS truth and streams with `vidu stream`; "
                         f"real clips and the synth bench read waves")


def _features(wave: torch.Tensor, n_latent: int, cfg: AudioConfig, before: int, after: int) -> torch.Tensor:
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform [N], got shape {tuple(wave.shape)}")
    padded = torch.cat([wave.new_zeros(pad_left(cfg, before)), wave.float()])
    return frame_logmel(padded, n_latent + before + after, cfg)


def audio_features(wave: torch.Tensor, n_latent: int, cfg: AudioConfig = AudioConfig(),
                   encoder: "Wav2Vec2Features | None" = None, context: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Conditioning features of a clip's `n_latent` latent frames with the speech `context` (before,
    after) the model hears (DiTConfig.audio_context): [before + n_latent + after, mel_per_latent, D],
    log-mel (D = n_mels) or wav2vec2 states. Context before the clip is silence; after it, the wave's
    continuation (or silence)."""
    b, a = context
    if encoder is None:
        return _features(wave, n_latent, cfg, b, a)
    return per_latent(encoder(wave, cfg), n_latent + b + a, cfg, pad_value=0.0, before=b)


class AudioStream:
    """The streaming form of `audio_features` (log-mel): push a stream's samples in order and read the
    features of frames [first, first + count) (context index: frame p is latent frame p - before) as
    soon as their samples are there; samples past the pushed ones (a peek at what has arrived but not
    played yet) are passed as `ahead`, zeros where missing. Gives exactly the features
    `audio_features` computes for the whole clip."""

    def __init__(self, cfg: AudioConfig, context: tuple[int, int] = (0, 0)):
        self.cfg, self.before = cfg, context[0]
        self.buf = torch.zeros(pad_left(cfg, self.before))
        self.offset = 0                  # padded-stream index of buf[0]

    def push(self, samples) -> None:
        self.buf = torch.cat([self.buf, torch.as_tensor(samples, dtype=torch.float32).reshape(-1)])

    def needed(self, first: int, count: int) -> int:
        """Stream samples (from the clip's sample 0) that frames [first, first + count) read."""
        c = self.cfg
        end = (first + count - 1) * c.samples_per_latent + (c.mel_per_latent - 1) * c.hop + c.n_fft
        return end - pad_left(c, self.before)

    def features(self, first: int, count: int, ahead=None) -> torch.Tensor:
        """[count, mel_per_latent, n_mels]; forgets the samples before frame `first` (reads go forward)."""
        start = first * self.cfg.samples_per_latent - self.offset
        if start < 0:
            raise ValueError(f"frame {first} was already passed")
        x = self.buf[start:]
        if ahead is not None and len(ahead):
            x = torch.cat([x, torch.as_tensor(ahead, dtype=torch.float32).reshape(-1)])
        out = frame_logmel(x, count, self.cfg)
        self.buf, self.offset = self.buf[start:], self.offset + start
        return out

    def state(self) -> dict:
        """What to continue from (stages/stream/state.py: tensors and JSON values)."""
        return {"buf": self.buf, "offset": self.offset}

    def load_state(self, st: dict) -> None:
        self.buf, self.offset = st["buf"], st["offset"]


def audio_latent(wave: torch.Tensor, n_latent: int, tokens: int, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """Joint-branch latent [n_latent, tokens, mel_per_latent // tokens * n_mels]."""
    if cfg.mel_per_latent % tokens:
        raise ValueError(f"{cfg.mel_per_latent} mel steps per latent frame do not split into {tokens} tokens")
    return _features(wave, n_latent, cfg, 0, 0).reshape(n_latent, tokens, -1)


def latent_to_logmel(lat: torch.Tensor, cfg: AudioConfig = AudioConfig(), first: bool = True) -> torch.Tensor:
    """[n_latent, tokens, C] -> natural-log mel [T, n_mels] on the clip's own timeline: T * hop samples that
    play with the latents' video frames. `first` (a whole clip, or a stream's first chunk): the lead-in
    before frame 0 dropped; a later chunk keeps all its steps."""
    steps = lat.float().reshape(-1, cfg.n_mels) * LOGMEL_SCALE + LOGMEL_CENTER
    return steps[cfg.mel_per_latent - cfg.mel_per_video_frame:] if first else steps


def to_waveform(lat: torch.Tensor, cfg: AudioConfig = AudioConfig(), n_iter: int = 32) -> torch.Tensor:
    """Joint audio latent -> waveform [N] at cfg.sample_rate by Griffin-Lim over the whole clip (the vocoder
    of our own is models.vocoder)."""
    return _griffin_lim(latent_to_logmel(lat, cfg), cfg, n_iter)


@lru_cache(maxsize=4)
def _inverse(cfg: AudioConfig, n_iter: int):
    from torchaudio.transforms import GriffinLim, InverseMelScale
    inv = InverseMelScale(cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, driver="gelsd")
    gl = GriffinLim(n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop, power=2.0, n_iter=n_iter,
                    rand_init=False)
    return inv, gl


def _griffin_lim(log_mel: torch.Tensor, cfg: AudioConfig, n_iter: int) -> torch.Tensor:
    """natural-log mel [T, n_mels] -> waveform [(T - 1) * hop]."""
    inv, gl = _inverse(cfg, n_iter)
    return gl(inv(log_mel.exp().T))


class Wav2Vec2Features:
    """wav2vec2-family hidden states (transformers, from a local directory), resampled to the mel rate."""

    def __init__(self, path: str | Path, layer: int = -1, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, AutoModel
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"wav2vec2 model directory not found: {path}")
        self.extractor = AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.layer, self.device = layer, device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
        inputs = self.extractor(wave.numpy(), sampling_rate=cfg.sample_rate, return_tensors="pt")
        out = self.model(inputs.input_values.to(self.device), output_hidden_states=True)
        h = out.hidden_states[self.layer][0].float().cpu()        # [T_w2v, D] at ~50 Hz
        steps = wave.shape[0] // cfg.hop + 1
        return F.interpolate(h.T[None], size=steps, mode="linear", align_corners=False)[0].T


def chunk_waveform(lat: torch.Tensor, first: bool, cfg: AudioConfig = AudioConfig(), n_iter: int = 16) -> torch.Tensor:
    """Per-chunk Griffin-Lim of `latent_to_logmel` (each chunk alone: it clicks at chunk edges; `vidu stream
    --audio-out generated` plays models.vocoder.ChunkVoice, the baseline this is)."""
    log_mel = latent_to_logmel(lat, cfg, first)
    samples = log_mel.shape[0] * cfg.hop
    wave = _griffin_lim(log_mel, cfg, n_iter)
    return wave[:samples] if wave.shape[0] >= samples else F.pad(wave, (0, samples - wave.shape[0]))
