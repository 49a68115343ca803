"""Is a reference image far from what the starter model knows? The starter (models/starter) was trained
on the synthetic world's drawn characters only. This measures `models.starter.flat_share` (the share of
pixels equal to all four neighbours once the image is cover-scaled to the model's size) on world
references and on the real media of ../shared/media, which never set the bound (FLAT_MIN comes from the
world alone), and prints which of them `reference_warning` warns about.

    python benchmarks/reference_ood.py [--world 300] [--media ../shared/media]

World references: stages.synth identities of seeds 0..N-1 (even seeds train split, odd eval), each style,
rendered neutral at 256x256, the first 60 also at 960x540 and as a JPEG (quality 95) of the 256 render.
Real: frame 75 (3 s at 25 fps) of each video under --media (talking heads and scenes).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.starter import FLAT_MIN, flat_share, reference_warning  # noqa: E402

SIZE = (256, 256)       # the starter's height x width


def world(n: int) -> dict[str, list[float]]:
    from PIL import Image
    from stages import synth
    out: dict[str, list[float]] = {"png 256": [], "png 960x540": [], "jpeg q95": []}
    for seed in range(n):
        s = synth.make_sample(seed, width=256, height=256, fps=25, seconds=0.2, split="eval" if seed % 2 else "train")
        ref = synth.render(s.identity, synth.State(), 256, 256, s.scene)
        out["png 256"].append(flat_share(ref, *SIZE))
        out.setdefault(f"style {s.identity.style}", []).append(out["png 256"][-1])
        if seed < 60:
            out["png 960x540"].append(flat_share(synth.render(s.identity, synth.State(), 960, 540, s.scene), *SIZE))
            b = io.BytesIO()
            Image.fromarray(ref).save(b, "JPEG", quality=95)
            out["jpeg q95"].append(flat_share(np.asarray(Image.open(b).convert("RGB")), *SIZE))
    return out


def frame(path: Path, index: int = 75) -> np.ndarray:
    import av
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == index:
                return f.to_ndarray(format="rgb24")
    raise ValueError(f"{path} has fewer than {index + 1} frames")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=300)
    ap.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    args = ap.parse_args()
    print(f"FLAT_MIN {FLAT_MIN}")
    print("| world references | n | min | 1st percentile | median | warned |")
    print("|---|---|---|---|---|---|")
    for name, v in world(args.world).items():
        print(f"| {name} | {len(v)} | {min(v):.3f} | {np.percentile(v, 1):.3f} | {np.median(v):.3f} | "
              f"{sum(x < FLAT_MIN for x in v)} |")
    print("\n| real frame | flat share | warned |")
    print("|---|---|---|")
    for path in sorted([*args.media.glob("talking/*.mp4"), *args.media.glob("scenes/*")]):
        rgb = frame(path)
        print(f"| {path.name} | {flat_share(rgb, *SIZE):.3f} | {'yes' if reference_warning(rgb, *SIZE) else 'no'} |")


if __name__ == "__main__":
    main()
