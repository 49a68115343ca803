"""The distances d of the PCM regularizer (pcm.py, eq. 7) between the student's chunk and its EMA target,
both video latents [B, C, c, h, w] of one chunk; `DistillSettings.pcm_distance` picks one:

- "latent": the mean squared difference of the latents (PCM's behaviour before this module).
- "codec": a perceptual distance with the run's own autoencoder (TAEHV, models/taehv.py; the codec the
  teacher was trained with). Both chunks are decoded by its decoder, the decoded frames read by its
  ENCODER, and its intermediate feature maps compared LPIPS-style (Zhang et al. 2018, the "baseline"
  variant without learned weights): per layer, each position's channel vector scaled to unit length,
  the squared difference summed over channels, averaged over positions, frames and batch, and the layers
  summed. The layers are the encoder's first ReLU (full resolution) and the end of each of its stages
  (after the last MemBlock: 1/2, 1/4 and 1/8 of the frame), not its last conv (that IS the latent). No
  learned linear weights: every channel counts alike (LPIPS's calibration needs human judgements of
  natural images, which we have none of). Both codec halves are frozen (requires_grad False) and shared
  with the run's data; the gradient reaches the student's latents through the decoder and the encoder;
  the target's features are taken under no_grad.
- "lpips": LPIPS itself (v0.1) on the decoded frames (scaled to [-1, 1] as LPIPS expects), with weights
  the user has, since nothing can be downloaded here: `--lpips PATH`, a torchvision AlexNet or VGG16
  state dict (`torchvision.models.alexnet().state_dict()`; a full LPIPS module's state dict, keys
  net.sliceK.N.*, is read too) and the LPIPS linear layers, from the same file when it holds them
  (linK.model.1.weight), else `--lpips-lin PATH`, else the file the PyPI `lpips` package ships
  (lpips/weights/v0.1/alex.pth | vgg.pth; vidu's optional extra "lpips"). The network is built here on
  torchvision's AlexNet / VGG16 definitions (weights=None, no download); the lpips package's own code is
  not used: its LPIPS class asks torchvision for the ImageNet backbone unless told to start random, and
  loads the linear layers with strict=False (a wrong file would pass silently); only its weight file is
  read (found without importing the package).

Decoding a chunk: the chunk's latents alone, each to all t_upscale frames the decoder makes of it (no
start-up trim, as decode_video applies to a whole clip's first latent), values not clamped to [0, 1]
(clamping would stop the gradient where the student's frame leaves the range). Both branches are decoded
alike, so d is 0 exactly where the chunks agree.

Cost, measured on the CPU (one thread of this machine's 2 shared cores; medians of 10 interleaved steps),
tiny preset at 64 x 64, batch 2, rollouts of 3 chunks of 1 latent frame, a random teacher and codec: a
Distiller step takes 108 ms without PCM, 131 ms with PCM in "latent", 210 ms in "codec" (+80 ms, +60 %)
and 216 ms in "lpips" (a random AlexNet). The distance alone, forward and backward of the chunk's 2 x 4
decoded frames: "codec" 84 ms (decode of both chunks, encoder features of both, backward through the
student's), "lpips" 70 ms, "latent" 1 ms. All grow with the frame size.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTANCES = ("auto", "latent", "codec", "lpips")

Distance = Callable[[Tensor, Tensor], Tensor]


def latent_distance(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared difference (in float32) of two latents of one shape."""
    return (pred.float() - target.float()).square().mean()


def resolve(setting: str, codec, lpips: str | None) -> str:
    """The distance a run uses: `setting` unless "auto", which is "lpips" where `lpips` weights were given,
    else "codec" where the run has its `codec`, else "latent"."""
    if setting == "auto":
        return "lpips" if lpips else "codec" if codec is not None else "latent"
    if setting in ("codec", "lpips") and codec is None:
        raise ValueError(f"--pcm-distance {setting} decodes the chunks with the teacher's autoencoder, and this "
                         f"run has none")
    return setting


def build(setting: str, codec=None, lpips: str | None = None, lpips_lin: str | None = None) -> tuple[str, Distance]:
    """(the resolved name, d(pred, target)) for the settings; raises ValueError (one line) for weights that
    cannot be used."""
    name = resolve(setting, codec, lpips)
    if name == "latent":
        return name, latent_distance
    if name == "codec":
        return name, CodecDistance(codec)
    return name, LPIPSDistance(codec, load_lpips(lpips, lpips_lin))


def unit_channels(f: Tensor, dim: int) -> Tensor:
    """Each position's channel vector (along `dim`) scaled to unit length (0 stays 0)."""
    return F.normalize(f.float(), dim=dim, eps=1e-10)


def feature_distance(fa: list[Tensor], fb: list[Tensor], dim: int, lins: list[nn.Module] | None = None) -> Tensor:
    """LPIPS's comparison of two lists of feature maps (channels along `dim`; the other dims are
    positions, frames and batch): unit channel vectors, squared difference, summed over channels (or
    weighted by `lins`, 1x1 convs of LPIPS, channels at dim 1), averaged over the rest, summed over layers."""
    total = 0.0
    for k, (a, b) in enumerate(zip(fa, fb)):
        sq = (unit_channels(a, dim) - unit_channels(b, dim)).square()
        total = total + (sq.sum(dim) if lins is None else lins[k](sq)).mean()
    return total


def decode_chunk(codec, latents: Tensor) -> Tensor:
    """A chunk's video latents [B, C, c, h, w] (the DiT's layout) -> frames [B, t_upscale c, 3, 8h, 8w],
    not trimmed nor clamped (see the module doc); gradients flow through."""
    from models.taehv import apply_blocks
    return apply_blocks(codec.decoder, codec.unnormalize(latents.permute(0, 2, 1, 3, 4)))


class _Through(torch.autograd.Function):
    """`value` forward; backward hands `pred` the gradient `grad` computed beforehand (times the incoming one)."""

    @staticmethod
    def forward(ctx, pred: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, out: Tensor):
        (grad,) = ctx.saved_tensors
        return (out * grad).to(grad.dtype), None, None


class Decoded:
    """A distance of decoded frames: d(pred, target) decodes both chunks with the frozen `codec` (the
    target under no_grad) and compares the frames (`compare`, the target's features under no_grad).

    Memory: the decoder's and the feature network's activations of a whole batch at full frame size are
    many GiB (batch 32 at 256 x 256 ran an H200 out of memory beside three other runs), so the batch is
    taken `piece` samples at a time: each piece's distance and its gradient with respect to its latents
    are computed at once (its activations freed before the next piece), and the pieces' gradients reach
    `pred` in the caller's backward (`_Through`). d is a mean over samples, so the value and the gradient
    equal the whole batch's (float summation order aside); only one piece's activations are alive."""

    def __init__(self, codec, piece: int = 4):
        self.codec = codec.eval().requires_grad_(False)
        self.piece = piece

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        B, wanted = pred.shape[0], pred.requires_grad and torch.is_grad_enabled()
        total, grads = torch.zeros((), device=pred.device), []
        for a in range(0, B, self.piece):
            p, share = pred[a:a + self.piece].detach(), min(self.piece, B - a) / B
            with torch.no_grad():
                want = decode_chunk(self.codec, target[a:a + self.piece])
            with torch.enable_grad() if wanted else torch.no_grad():
                p.requires_grad_(wanted)
                d = share * self.compare(decode_chunk(self.codec, p), want)
            if wanted:
                grads.append(torch.autograd.grad(d, p)[0])
            total = total + d.detach().float()
        return _Through.apply(pred, total, torch.cat(grads)) if wanted else total

    def compare(self, got: Tensor, want: Tensor) -> Tensor:
        """d between frame sets [N, T, 3, H, W] in [0, 1]; the gradient reaches `got` only."""
        with torch.no_grad():
            fw = self.features(want)
        return feature_distance(self.features(got), fw, *self.how())

    def features(self, frames: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def how(self) -> tuple:
        raise NotImplementedError


class CodecDistance(Decoded):
    """d of "codec" (the module doc): the run's TAEHV decodes, its encoder's feature maps compare."""

    def __init__(self, codec, piece: int = 4):
        from models.taehv import MemBlock
        super().__init__(codec, piece)
        enc = codec.encoder
        # cut after the first ReLU and after the last MemBlock of each stage; the final conv is left out
        cuts = [2] + [i + 1 for i in range(len(enc) - 1)
                      if isinstance(enc[i], MemBlock) and not isinstance(enc[i + 1], MemBlock)]
        self.parts = [enc[a:b] for a, b in zip([0, *cuts], cuts)]

    def features(self, frames: Tensor) -> list[Tensor]:
        """Frames [N, T, 3, H, W] in [0, 1] (T a multiple of the encoder's time downscale) -> the feature
        maps [N, T', C, H', W'] at the cuts."""
        from models.taehv import apply_blocks
        out, h = [], frames
        for part in self.parts:
            h = apply_blocks(part, h)
            out.append(h)
        return out

    def how(self) -> tuple:
        return (2,)                                      # channels at dim 2, no weights


# --- LPIPS ---------------------------------------------------------------------------------------------

# torchvision `features` indices of the ReLUs LPIPS reads (relu1..relu5) and their channels
_TAPS = {"alex": ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
         "vgg": ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512))}
_SHIFT, _SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)     # LPIPS v0.1's input scaling layer
LPIPS_EXTRA = "pip install lpips: vidu's optional extra of that name"


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): a torchvision AlexNet / VGG16 `features` read at relu1..relu5,
    unit channel vectors, squared differences weighted by one 1x1 conv per layer (lin0..lin4), averaged
    over positions and frames, summed over layers. Frames [N, 3, H, W] in [-1, 1]. Its backbone's weights
    are uninitialised until loaded (`load_lpips`)."""

    def __init__(self, net: str):
        import torchvision
        super().__init__()
        self.net_name = net
        taps, chns = _TAPS[net]
        make = torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16
        with torch.device("meta"):       # torchvision's definition, no download (weights=None), no init: the
            features = make(weights=None).features[:taps[-1] + 1]    # classifier is never allocated
        self.features = features.to_empty(device="cpu")             # load_lpips fills every weight
        self.taps = taps
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        self.register_buffer("shift", torch.tensor(_SHIFT)[:, None, None])
        self.register_buffer("scale", torch.tensor(_SCALE)[:, None, None])

    def layers(self, x: Tensor) -> list[Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for i, m in enumerate(self.features):
            h = m(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return feature_distance(self.layers(a), self.layers(b), 1, list(self.lins))


def load_lpips(path: str | None, lin: str | None = None) -> LPIPS:
    """The LPIPS network of the user's backbone file `path` and linear layers (the module doc says where
    they are looked for); raises ValueError (one line) for a missing or unfit file."""
    if not path:
        raise ValueError("--pcm-distance lpips needs the backbone's weights: --lpips PATH (a torchvision "
                         "AlexNet or VGG16 state dict)")
    sd = _read(path, "--lpips")
    backbone = {}
    for k, v in sd.items():
        if k.startswith("features."):
            backbone[k[len("features."):]] = v
        elif k.startswith("net.slice"):                   # an LPIPS module's own state dict
            backbone[k.split(".", 2)[2]] = v
    first = backbone.get("0.weight")
    if first is None or first.ndim != 4:
        raise ValueError(f"--lpips {path} is not a torchvision AlexNet or VGG16 state dict (no features.0.weight)")
    net = "alex" if tuple(first.shape[-2:]) == (11, 11) else "vgg"
    model = LPIPS(net)
    lins, where = {k: v for k, v in sd.items() if k.startswith("lin")}, f"--lpips {path}"
    if lin or not lins:
        lin, flag = _lin_file(lin, net)
        lins, where = _read(lin, flag), f"{flag} {lin}"
    try:
        model.features.load_state_dict({k: v for k, v in backbone.items() if int(k.split(".")[0]) < len(model.features)})
        # the lpips package's layout: linK.model.1.weight (a Dropout before the conv), or linK.weight
        model.lins.load_state_dict({f"{k.split('.')[0][3:]}.weight": v for k, v in lins.items()
                                    if k.split(".")[0][3:].isdigit()})
    except (RuntimeError, ValueError) as e:
        why = " ".join(" ".join(str(e).split()).replace("Error(s) in loading state_dict for ", "").split()[:30])
        raise ValueError(f"--lpips {path} ({net}) with the linear layers of {where} does not load: {why}") from None
    return model.eval().requires_grad_(False)


def _read(path: str, flag: str) -> dict:
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such weights file")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # noqa: BLE001 - any unreadable file is one line
        raise ValueError(f"{flag} {path} is not a state dict file ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{flag} {path} is not a state dict (a mapping of names to tensors)")
    return sd


def _lin_file(lin: str | None, net: str) -> tuple[str, str]:
    """(the linear layers' file, how it was named): `lin`, else the lpips package's shipped file."""
    if lin:
        return lin, "--lpips-lin"
    spec = importlib.util.find_spec("lpips")        # locates the package without running its code
    if spec is None or spec.origin is None:
        raise ValueError(f"LPIPS's linear layers: give --lpips-lin PATH or install the lpips package "
                         f"({LPIPS_EXTRA}), which ships them")
    shipped = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"
    if not shipped.is_file():
        raise ValueError(f"the lpips package has no {shipped}; give --lpips-lin PATH")
    return str(shipped), "the lpips package's file"


class LPIPSDistance(Decoded):
    """d of "lpips": LPIPS of the frames the codec decodes of both chunks, averaged over frames."""

    def __init__(self, codec, net: LPIPS):
        super().__init__(codec)
        self.net = net.to(next(codec.parameters()).device)

    def features(self, frames: Tensor) -> list[Tensor]:
        return self.net.layers(frames.flatten(0, 1) * 2 - 1)         # LPIPS reads [-1, 1]

    def how(self) -> tuple:
        return 1, list(self.net.lins)
