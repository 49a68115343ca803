"""A small causal vocoder of our own: the joint audio branch's log-mel -> waveform, streamed chunk by
chunk without seams (issue 19).

Shape: natural-log mel [T, n_mels] (models/audio.py's frame: step j centred at sample j * hop) ->
causal ConvNeXt-style blocks over steps (depthwise conv of `kernel` steps looking back only, then a
pointwise MLP) -> per step a log-magnitude and a phase (as an unnormalised 2-D vector) of an
n_fft-point spectrum -> inverse FFT, synthesis window, overlap-add at hop, divided by the summed
squared window (a Vocos-style iSTFT head, Siuzdak 2023, without its GAN). Output step j is a
function of input steps <= j only, and overlap-add is the only coupling between steps, so
`VocoderStream` (push steps, get every sample no later step can change) gives exactly `synthesize`'s
samples, whatever the chunking: nothing happens at a chunk edge that does not happen everywhere.
Latency: a sample is final once the step whose window starts after it has arrived, n_fft / 2 = 16 ms
past its own step.

Weights: `load(path)`; the shipped ones (VOCODER_FILE, bf16 safetensors with the config in the
metadata) are reproduced by `python benchmarks/train_vocoder.py` (stages/train/vocoder.py: espeak-ng
voices, spectral losses, CPU minutes).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.audio import LOGMEL_CENTER, LOGMEL_SCALE   # the joint latent's normalisation of natural-log mel

VOCODER_FILE = Path(__file__).with_name("vocoder.safetensors")


@dataclass(frozen=True)
class VocoderConfig:
    n_mels: int = 80
    n_fft: int = 512
    hop: int = 160
    dim: int = 128
    blocks: int = 4
    kernel: int = 7           # steps each depthwise conv reads, the current one and kernel - 1 before
    mlp: int = 3              # pointwise MLP width, x dim

    @property
    def context(self) -> int:
        """Past input steps an output step depends on (besides its own)."""
        return self.blocks * (self.kernel - 1)


class _Block(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.pad = cfg.kernel - 1
        self.dw = nn.Conv1d(cfg.dim, cfg.dim, cfg.kernel, groups=cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.up = nn.Linear(cfg.dim, cfg.mlp * cfg.dim)
        self.down = nn.Linear(cfg.mlp * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: [B, D, T]
        h = self.dw(F.pad(x, (self.pad, 0), mode="replicate")).transpose(1, 2)
        return x + self.down(F.gelu(self.up(self.norm(h)))).transpose(1, 2)


class Vocoder(nn.Module):
    def __init__(self, cfg: VocoderConfig = VocoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Conv1d(cfg.n_mels, cfg.dim, 1)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 3 * (cfg.n_fft // 2 + 1))
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def spectra(self, log_mel: torch.Tensor) -> torch.Tensor:
        """log-mel [B, T, n_mels] -> complex spectra [B, T, n_fft // 2 + 1]; step t reads steps <= t."""
        x = self.inp(((log_mel - LOGMEL_CENTER) / LOGMEL_SCALE).transpose(1, 2))
        for b in self.blocks:
            x = b(x)
        logmag, re, im = self.head(self.norm(x.transpose(1, 2))).chunk(3, dim=-1)
        mag = torch.exp(logmag.clamp(max=6.0))
        phase = torch.complex(re, im)
        return mag * phase / (phase.abs() + 1e-6)

    def frames(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[B, T, n_mels] -> windowed time frames [B, T, n_fft]: frame t covers samples t * hop - n_fft / 2 ..."""
        return torch.fft.irfft(self.spectra(log_mel), n=self.cfg.n_fft) * self.window

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[B, T, n_mels] -> waveform [B, T * hop] (samples 0 .. T * hop: the last n_fft / 2 - hop lack later steps)."""
        return overlap_add(self.frames(log_mel), self.window, self.cfg.hop)[..., self.cfg.n_fft // 2:][..., :log_mel.shape[1] * self.cfg.hop]

    @torch.no_grad()
    def synthesize(self, log_mel: torch.Tensor) -> torch.Tensor:
        """natural-log mel [T, n_mels] -> waveform [T * hop] (models.audio.Vocoder's contract, one clip)."""
        return self(log_mel.float()[None])[0]


def overlap_add(frames: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """[B, T, N] windowed frames, frame t starting at sample t * hop -> [B, (T - 1) * hop + N]: their
    sum over the squared windows' sum."""
    B, T, N = frames.shape
    L = (T - 1) * hop + N
    fold = lambda x: F.fold(x.transpose(1, 2), (1, L), (1, N), stride=(1, hop))[:, 0, 0]  # noqa: E731
    return fold(frames) / fold((window ** 2).expand(1, T, N)).clamp_min(1e-3)


class VocoderStream:
    """Streaming `Vocoder.forward`: `push(log_mel [n, n_mels])` -> the samples no later step changes
    (n * hop each, 256 samples late overall); `flush()` -> the rest, up to T * hop. The pieces joined
    are `synthesize` of all the steps (to float rounding)."""

    def __init__(self, vocoder: Vocoder):
        self.v, c = vocoder, vocoder.cfg
        self.hist = torch.zeros(0, c.n_mels)         # the last `context` input steps (new steps' outputs
                                                     # read no further back; padding reaches only step < context)
        self.tail = torch.zeros(0)                   # summed frames past the emitted samples
        self.tail_env = torch.zeros(0)
        self.steps = 0                               # steps pushed
        self.emitted = 0                             # samples emitted (from sample 0)

    @torch.no_grad()
    def push(self, log_mel: torch.Tensor) -> torch.Tensor:
        c = self.v.cfg
        n = log_mel.shape[0]
        if n == 0:
            return torch.zeros(0)
        x = torch.cat([self.hist, log_mel.float()])
        frames = self.v.frames(x[None])[0, -n:]       # [n, n_fft]: x starts at step 0 or `context` before
        self.hist = x[-c.context:] if c.context else x[:0]
        start = self.steps * c.hop - c.n_fft // 2                               # first new frame's first sample
        self.steps += n
        L = (n - 1) * c.hop + c.n_fft
        out = torch.zeros(start + L - self.emitted) if start + L > self.emitted else torch.zeros(0)
        env = torch.zeros_like(out)
        base = self.emitted
        out[:len(self.tail)] += self.tail
        env[:len(self.tail_env)] += self.tail_env
        w2 = self.v.window ** 2
        for t in range(n):
            a = start + t * c.hop - base
            lo = max(0, -a)
            out[a + lo:a + c.n_fft] += frames[t, lo:]
            env[a + lo:a + c.n_fft] += w2[lo:]
        done = max(0, self.steps * c.hop - c.n_fft // 2 - base)                 # frame `steps` starts there
        self.tail, self.tail_env = out[done:].clone(), env[done:].clone()
        self.emitted += done
        return out[:done] / env[:done].clamp_min(1e-3)

    def flush(self) -> torch.Tensor:
        """The samples up to steps * hop (the end `forward` gives); the stream is then done."""
        end = self.steps * self.v.cfg.hop - self.emitted
        out = self.tail[:end] / self.tail_env[:end].clamp_min(1e-3)
        self.tail, self.tail_env = self.tail[:0], self.tail_env[:0]
        self.emitted += len(out)
        return out


class ChunkVoice:
    """A stream's joint audio, chunk by chunk, through one VocoderStream: `(lat, first)` -> the samples that
    play with the chunk's video frames (models.audio.latent_to_logmel's steps x hop, as many as per-chunk
    Griffin-Lim gives). The vocoder's 16-ms lag (n_fft / 2 samples) is paid once, as silence at the start of
    the vocoder stream's first chunk, so every chunk's samples line up with its frames 16 ms late and none is cut at an edge."""

    def __init__(self, vocoder: Vocoder, cfg):
        c = vocoder.cfg
        if (c.n_mels, c.hop) != (cfg.n_mels, cfg.hop):
            raise ValueError(f"the vocoder takes {c.n_mels} mels at hop {c.hop}; the model's audio has "
                             f"{cfg.n_mels} at hop {cfg.hop}")
        self.cfg, self.stream = cfg, VocoderStream(vocoder)

    def __call__(self, lat: torch.Tensor, first: bool) -> torch.Tensor:
        from models.audio import latent_to_logmel
        fresh = self.stream.steps == 0            # a stream's first chunk, or one resumed without this state
        out = self.stream.push(latent_to_logmel(lat, self.cfg, first))
        return torch.cat([torch.zeros(self.stream.v.cfg.n_fft // 2), out]) if fresh else out

    def state(self) -> dict:
        s = self.stream
        return {"hist": s.hist, "tail": s.tail, "tail_env": s.tail_env, "steps": s.steps, "emitted": s.emitted}

    def load_state(self, state: dict) -> None:
        s = self.stream
        s.hist, s.tail, s.tail_env = state["hist"].float(), state["tail"].float(), state["tail_env"].float()
        s.steps, s.emitted = int(state["steps"]), int(state["emitted"])


def save(v: Vocoder, path: str | Path, meta: dict | None = None) -> None:
    """bf16 safetensors, the config (and `meta`, e.g. the recipe) in the metadata."""
    from safetensors.torch import save_file

    state = {k: t.detach().to(torch.bfloat16).contiguous() for k, t in v.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(v.cfg)), **{k: str(x) for k, x in (meta or {}).items()}})


def load(path: str | Path | None = None) -> Vocoder:
    """The vocoder at `path` (default: the shipped VOCODER_FILE), float32 on CPU, eval mode."""
    from safetensors import safe_open

    path = Path(path) if path is not None else VOCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"vocoder weights not found: {path} (train them: python benchmarks/train_vocoder.py --out {path})")
    with safe_open(str(path), "pt") as f:
        cfg = VocoderConfig(**json.loads(f.metadata()["config"]))
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    v = Vocoder(cfg)
    v.load_state_dict(state)
    return v.eval()
