"""Which noise levels decide the mouth, and how much training each timestep shift and loss weighting
spends there (issue 15: "x0 loss with shift 5 gives almost no weight to the low-noise steps where a
5-pixel mouth lives").

Signals, measured on world frames encoded by the trained `small` codec (normalized latents, as the
DiT sees them): for each of `--per-style` characters of each style in its own random scene, a static
clip (one frame, the codec pads it to a 4-frame group) of the neutral state and of the same state
with one thing changed: mouth opened 0 -> `--mouth` (mouth) and 0 -> 0.15 (small), head turned (yaw), head nodded (pitch);
identity: two different characters of the same style at the neutral state. Per pair, var(diff) =
mean over the region's latent elements of (z_a - z_b)^2; regions at latent resolution (32 x 32, an
8 x 8 pixel block counts when a render mask covers it): mouth (the mouth mask of both states), face,
frame. Under x_t = (1 - s) x_0 + s eps the per-element SNR of a difference is
(1 - s)^2 var(diff) / s^2; it crosses 1 at s* = sd / (1 + sd), sd = sqrt(var(diff)); "pooled" is the
matched filter over all elements of the region (SNR x n elements). The band where a signal is decided
is per-element SNR in [1/4, 4].

Candidates: training level s = shift(u, k), u ~ U(0, 1), clamped to [1e-3, 1] (objectives._sigma),
k in {1, 2, 3, 5}; loss weights in x0-error units (x0_hat - x0 = -s (v_hat - v)): x0 (1), v (1/s^2),
minsnr (min(SNR, 5), SNR = ((1 - s) / s)^2, the min-SNR-5 rule, the same in any parametrization),
clip (SNR clamped to [1, 5]: the x0 loss where SNR < 1, up to 5x where the latent is mostly visible);
each with or without a mouth-region weight (x `--mouth-weight` on the mouth's latent elements).
Reported per candidate: share of samples in the mouth band; share of the loss gradient in the mouth
band (weight x the per-element MMSE s^2 / ((1 - s)^2 + s^2) of a unit-variance latent, i.e. where
the loss is large after the easy part is learnt); the same for the identity band and above it (s past
the identity band: the first steps from pure noise, which a sampler must still be trained for); mouth
elements' share of the loss.

    nice -n 10 python benchmarks/noise_schedule.py --per-style 8      # ~10 min on 2 busy CPU cores

Progress on stderr; the signal table, then the candidate table (last) on stdout.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

CODEC = "artifacts/autoencoder/ema_bf16.safetensors"
SHIFTS = (1.0, 2.0, 3.0, 5.0)
WEIGHTS = ("x0", "v", "minsnr", "clip")
GAMMA = 5.0  # min-SNR-gamma
SMALL_MOUTH = 0.15  # a barely open mouth (consonants, a half-closed syllable)
BAND = (0.25, 4.0)  # per-element SNR range in which a signal is being decided


def states(mouth: float) -> dict[str, dict]:
    from stages.synth import State
    base = State()
    return {"neutral": base, "mouth": State(mouth=mouth), "yaw": State(yaw=0.5), "pitch": State(pitch=0.5),
            "mouth_small": State(mouth=SMALL_MOUTH)}


def latent_mask(cover: np.ndarray) -> np.ndarray:
    """[H, W] coverage in [0, 1] -> [H/8, W/8] bool (some pixel of the 8 x 8 block > 0.5)."""
    H, W = cover.shape
    return (cover.reshape(H // 8, 8, W // 8, 8) > 0.5).any((1, 3))


def render_character(seed: int, style: str, mouth: float) -> tuple[np.ndarray, dict]:
    """Frames [S, 256, 256, 3] of the states and masks {region: [S, 32, 32] bool}."""
    from stages.synth.render import render_clip
    from stages.synth.world import TRACKS, random_identity, random_scene
    r_id, r_scene = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    ident = random_identity(r_id, style)
    scene = random_scene(r_scene, ident)
    st = list(states(mouth).values())
    frames, masks = render_clip(ident, {k: [getattr(s, k) for s in st] for k in TRACKS}, 256, 256, scene, masks=True)
    return frames, {k: np.stack([latent_mask(m) for m in masks[k]]) for k in ("face", "mouth")}


@torch.no_grad()
def encode(codec, frames: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 stills -> [N, 16, H/8, W/8] latents (each a 1-frame clip)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)[:, None].float() / 255
    return codec.encode_video(x)[:, 0].numpy().astype(np.float64)


def pair_var(a: np.ndarray, b: np.ndarray, region: np.ndarray | None) -> tuple[float, int]:
    """(mean of (a - b)^2 over the region's elements, their count); a, b [C, h, w]; region [h, w]."""
    d2 = (a - b) ** 2
    if region is None:
        return float(d2.mean()), d2.size
    return float(d2[:, region].mean()), int(region.sum()) * d2.shape[0]


def measure(per_style: int, mouth: float) -> dict[str, list[tuple[float, int]]]:
    from models.checkpoint import load_taehv
    from stages.synth import STYLES
    codec = load_taehv(CODEC)
    sig: dict[str, list] = {}
    for style in STYLES:
        lat = []
        for i in range(per_style):
            t0 = time.perf_counter()
            frames, masks = render_character(10_000 + 100 * list(STYLES).index(style) + i, style, mouth)
            z = encode(codec, frames)  # [S, 16, 32, 32]: neutral, mouth, yaw, pitch, mouth_small
            lat.append(z[0])
            m_reg = masks["mouth"][0] | masks["mouth"][1]
            face = masks["face"][0]
            sig.setdefault(f"mouth {mouth:g}: mouth region", []).append(pair_var(z[0], z[1], m_reg))
            sig.setdefault(f"mouth {mouth:g}: face outside mouth", []).append(pair_var(z[0], z[1], face & ~m_reg))
            sig.setdefault(f"mouth {mouth:g}: frame outside face", []).append(pair_var(z[0], z[1], ~face))
            sig.setdefault(f"mouth {SMALL_MOUTH:g}: mouth region", []).append(
                pair_var(z[0], z[4], masks["mouth"][0] | masks["mouth"][4]))
            for k, j in (("yaw", 2), ("pitch", 3)):
                f = face | masks["face"][j]
                sig.setdefault(f"{k} 0.5: face", []).append(pair_var(z[0], z[j], f))
                sig.setdefault(f"{k} 0.5: frame", []).append(pair_var(z[0], z[j], None))
            print(f"{style} {i}: {time.perf_counter() - t0:.1f} s, mouth cells {int(m_reg.sum())}", file=sys.stderr,
                  flush=True)
        for a in range(len(lat)):
            for b in range(a + 1, len(lat)):
                sig.setdefault("identity: frame", []).append(pair_var(lat[a], lat[b], None))
        sig.setdefault("latent variance (per element)", []).extend(
            (float(z.var(axis=(1, 2)).mean()), z.size) for z in lat)
    return sig


def s_at(snr: float, var: float) -> float:
    """Noise level at which (1 - s)^2 var / s^2 = snr."""
    sd = np.sqrt(var / snr)
    return float(sd / (1 + sd))


def shift(u: np.ndarray, k: float) -> np.ndarray:
    return np.clip(k * u / (1 + (k - 1) * u), 1e-3, 1.0)


def weight(name: str, s: np.ndarray) -> np.ndarray:
    snr = ((1 - s) / s) ** 2
    return {"x0": np.ones_like(s), "v": 1 / s ** 2, "minsnr": np.minimum(snr, GAMMA),
            "clip": np.clip(snr, 1.0, GAMMA)}[name]


def candidates(mouth_band: tuple[float, float], id_band: tuple[float, float], mouth_frac: float,
               mouth_weight: float) -> list[dict]:
    u = (np.arange(200_000) + 0.5) / 200_000
    rows = []
    for k in SHIFTS:
        s = shift(u, k)
        inm = (s >= mouth_band[0]) & (s <= mouth_band[1])
        inid = (s >= id_band[0]) & (s <= id_band[1])
        high = s > id_band[1]
        mmse = s ** 2 / ((1 - s) ** 2 + s ** 2)
        for w in WEIGHTS:
            g = weight(w, s) * mmse
            for lam in (1.0, mouth_weight):
                rows.append({"shift": k, "weight": w + ("" if lam == 1 else f"+mouth x{lam:g}"),
                             "samples_mouth_band": float(inm.mean()), "grad_mouth_band": float(g[inm].sum() / g.sum()),
                             "grad_id_band": float(g[inid].sum() / g.sum()), "grad_high": float(g[high].sum() / g.sum()),
                             "mouth_elem_share": mouth_frac * lam / (1 - mouth_frac + mouth_frac * lam)})
    for r in rows:
        r["mouth_score"] = r["grad_mouth_band"] * r["mouth_elem_share"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-style", type=int, default=8)
    ap.add_argument("--mouth", type=float, default=0.5, help="mouth opening of the open state (0 .. 1)")
    ap.add_argument("--mouth-weight", type=float, default=10.0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    sig = measure(a.per_style, a.mouth)
    print("| signal | pairs | var(diff) per element | elements | s at SNR=4 | s at SNR=1 | s at SNR=1/4 "
          "| s at pooled SNR=1 |\n|---|---|---|---|---|---|---|---|")
    summ = {}
    for name, vals in sig.items():
        v = float(np.mean([x for x, _ in vals]))
        n = float(np.mean([c for _, c in vals]))
        summ[name] = (v, n)
        print(f"| {name} | {len(vals)} | {v:.4f} | {n:.0f} | {s_at(BAND[1], v):.3f} | {s_at(1, v):.3f} | "
              f"{s_at(BAND[0], v):.3f} | {s_at(1 / n, v):.3f} |")
    vm, nm = summ[f"mouth {a.mouth:g}: mouth region"]
    vi, _ = summ["identity: frame"]
    mouth_band = (s_at(BAND[1], vm), s_at(BAND[0], vm))
    id_band = (s_at(BAND[1], vi), s_at(BAND[0], vi))
    mouth_frac = nm / (16 * 32 * 32)
    print(f"\nmouth band s in [{mouth_band[0]:.3f}, {mouth_band[1]:.3f}]; identity band s in "
          f"[{id_band[0]:.3f}, {id_band[1]:.3f}]; mouth elements {mouth_frac:.4f} of the latent\n")
    print("| shift | weight | samples in mouth band | loss gradient in mouth band | in identity band | above it "
          "| mouth elements' share of loss | mouth score (band x elements) |\n|---|---|---|---|---|---|---|---|")
    for r in candidates(mouth_band, id_band, mouth_frac, a.mouth_weight):
        print(f"| {r['shift']:g} | {r['weight']} | {r['samples_mouth_band']:.3f} | {r['grad_mouth_band']:.3f} | "
              f"{r['grad_id_band']:.3f} | {r['grad_high']:.3f} | {r['mouth_elem_share']:.4f} | {r['mouth_score']:.4f} |")


if __name__ == "__main__":
    main()
