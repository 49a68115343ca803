"""DER of the default `vidu diarize` method (silero-vad + resemblyzer windows + AHC) on the
pyannote sample against its reference RTTM, with pyannote.metrics (collar 0, overlap scored).

Run: python benchmarks/diarize_der.py [--media ../shared/media] [--threshold 0.32]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--media", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "media")
    ap.add_argument("--threshold", type=float, default=0.32)
    args = ap.parse_args()

    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    from stages.diarize import diarize_file

    ref = Annotation()
    for line in (args.media / "speech" / "pyannote_sample.rttm").read_text().splitlines():
        f = line.split()
        ref[Segment(float(f[3]), float(f[3]) + float(f[4]))] = f[7]
    t0 = time.perf_counter()
    d = diarize_file(args.media / "speech" / "pyannote_sample.wav", threshold=args.threshold)
    seconds = time.perf_counter() - t0  # includes loading silero-vad and resemblyzer
    hyp = Annotation()
    for t in d.turns:
        hyp[Segment(t.start, t.end)] = t.speaker
    r = DiarizationErrorRate(collar=0.0, skip_overlap=False)(ref, hyp, detailed=True)
    total = r["total"]
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(f"method: {d.method}, threshold {args.threshold}, speakers {len({t.speaker for t in d.turns})}")
    print(f"DER {r['diarization error rate']:.4f}  (reference speech {total:.2f} s)")
    for key in ("false alarm", "missed detection", "confusion"):
        print(f"  {key:17s} {r[key]:6.2f} s  {r[key] / total:.4f}")
    print(f"overlap flagged: {sum(b - a for a, b in d.overlap):.2f} s")
    print(f"runtime: {seconds:.1f} s for 30 s of audio")


if __name__ == "__main__":
    main()
