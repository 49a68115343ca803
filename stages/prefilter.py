"""`vidu prefilter`: probe, validate and de-duplicate raw media files into a videos manifest.

Per file (parallel): stat and content hash; PyAV probe (container, codecs, geometry, rotation,
frame rates, durations, start offsets); a demux pass (frame count, variable frame rate, true
stream spans, truncation); frames decoded at several positions (decodability and a perceptual
hash per position). Whole run: exact duplicates by content hash, near-duplicates (re-encodes,
resizes) by the per-position perceptual hashes; one representative is kept.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from manifests.io import file_digest
from stages.sense.media import MediaError, fraction_to_float, gray_frames_at, hamming, open_container, phash, scan_streams
from stages.run import Stage, base_row, ranged

HASH_POSITIONS = [(i + 0.5) / 8 for i in range(8)]  # relative positions of decode probes / phashes


def _file_id(path: str) -> str:
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def discover(inputs: list[str], exclude: Path | None = None) -> list[dict]:
    """Expand files, folders (recursive, following links once) and globs into items {id, path}.

    Paths that do not exist or cannot be listed become items too, so they end as rows with a
    reason instead of vanishing. Items are sorted by path; ids are stable hashes of the path.
    """
    found: dict[str, None] = {}
    excluded = str(exclude) if exclude else None

    def add(p: str) -> None:
        found.setdefault(os.path.abspath(p))

    for arg in inputs:
        matches = glob.glob(arg, recursive=True) if glob.has_magic(arg) else [arg]
        if not matches:
            add(arg)
        for m in matches:
            if not os.path.isdir(m):
                add(m)
                continue
            seen: set[tuple[int, int]] = set()
            for dirpath, dirnames, filenames in os.walk(m, followlinks=True, onerror=lambda e: add(e.filename)):
                try:
                    st = os.stat(dirpath)
                except OSError:
                    dirnames[:] = []
                    continue
                if (st.st_dev, st.st_ino) in seen or (excluded and os.path.abspath(dirpath) == excluded):
                    dirnames[:] = []  # a link back into a folder already walked, or our workspace
                    continue
                seen.add((st.st_dev, st.st_ino))
                dirnames.sort()
                for name in filenames:
                    add(os.path.join(dirpath, name))
    return [{"id": _file_id(p), "path": p} for p in sorted(found)]


def fingerprint(items: list[dict]) -> list:
    """Identity of the inputs' content: path, size and mtime of every item."""
    out = []
    for it in items:
        try:
            st = os.stat(it["path"])
            out.append([it["path"], st.st_size, st.st_mtime_ns])
        except OSError as e:
            out.append([it["path"], None, e.errno])
    return out


_ERRNO_CODES = {errno.ENOENT: "not_found", errno.ELOOP: "symlink_loop", errno.EACCES: "permission_denied",
                errno.EPERM: "permission_denied", errno.EISDIR: "not_a_file"}


@dataclass
class Prefilter(Stage):
    name: ClassVar[str] = "prefilter"
    kind: ClassVar[str] = "videos"
    version: ClassVar[str] = "1"
    reads: ClassVar[tuple[str, ...]] = ("path",)
    writes: ClassVar[tuple[str, ...]] = tuple(
        "size_bytes content_hash container duration_s video_codec width height rotation avg_fps real_fps vfr "
        "frame_count video_duration_s video_start_s audio_codec sample_rate channels audio_duration_s "
        "audio_start_s av_mismatch_s decode_probes decode_failures phash duplicate_of".split())

    min_fps: float = ranged(15.0, min=0)
    min_short_side: int = ranged(256, min=0)
    min_duration: float = ranged(3.0, min=0)
    max_duration: float = ranged(4 * 3600.0, min=0)
    require_audio: bool = True
    max_av_mismatch: float = ranged(0.5, min=0)  # seconds, between stream durations and between start offsets
    reject_vfr: bool = False
    phash_threshold: int = ranged(10, min=0, max=64)  # mean differing bits (of 64) per sampled frame for a near-duplicate

    def __post_init__(self):
        if not self.min_duration < self.max_duration:
            raise ValueError(f"--min-duration ({self.min_duration:g} s) must be below --max-duration ({self.max_duration:g} s)")

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("videos", id=item["id"], path=item["path"])

    def process(self, item: dict) -> list[dict]:
        row = base_row("videos", id=item["id"], path=item["path"])
        try:
            self._probe(row)
        except MediaError as e:
            row.update(status="rejected", error=str(e).splitlines()[0][:300])
            row["reasons"] = [e.code]
        return [row]

    def _probe(self, row: dict) -> None:
        path = row["path"]
        try:
            st = os.stat(path)
            if not os.path.isfile(path):
                raise MediaError("not_a_file", "not a regular file")
            row["size_bytes"] = st.st_size
            if st.st_size == 0:
                raise MediaError("zero_bytes", "empty file")
            row["content_hash"] = file_digest(path)
        except OSError as e:
            raise MediaError(_ERRNO_CODES.get(e.errno, "unreadable"), f"{e.strerror or e}") from None

        reasons: list[str] = []
        with open_container(path) as c:
            row["container"] = c.format.name
            row["duration_s"] = c.duration / 1e6 if c.duration is not None else None
            vs = c.streams.video[0] if c.streams.video else None
            aus = c.streams.audio[0] if c.streams.audio else None
            if aus is not None:
                row.update(audio_codec=aus.codec_context.name, sample_rate=aus.sample_rate,
                           channels=aus.codec_context.channels)
            if vs is None:
                raise MediaError("no_video", "no video stream (audio-only or other)" if aus else "no video stream")
            row.update(video_codec=vs.codec_context.name, width=vs.codec_context.width,
                       height=vs.codec_context.height, avg_fps=fraction_to_float(vs.average_rate),
                       real_fps=fraction_to_float(vs.base_rate))
            v_index, a_index = vs.index, (aus.index if aus is not None else None)

        scans = scan_streams(path, v_index, a_index)
        v = scans[v_index]
        row["frame_count"] = v.packets
        row["vfr"] = v.vfr
        if v.packets == 0 or v.start_s is None:
            raise MediaError("no_frames", "the video stream has no frames")
        row["video_start_s"] = v.start_s
        row["video_duration_s"] = v.end_s - v.start_s
        if row["video_duration_s"] > 0:
            row["avg_fps"] = v.packets / row["video_duration_s"]
        if row["duration_s"] is None:
            row["duration_s"] = row["video_duration_s"]
        if a_index is not None:
            a = scans[a_index]
            if a.packets and a.start_s is not None:
                row["audio_start_s"] = a.start_s
                row["audio_duration_s"] = a.end_s - a.start_s
                row["av_mismatch_s"] = abs(row["audio_duration_s"] - row["video_duration_s"])
        if row["video_duration_s"] < 0.9 * row["duration_s"] - 0.5:
            reasons.append("truncated")

        frames, rotation = gray_frames_at(path, [0.0] + HASH_POSITIONS)
        row["rotation"] = rotation or 0
        if row["rotation"] % 180 == 90:
            row["width"], row["height"] = row["height"], row["width"]
        row["decode_probes"] = len(frames)
        row["decode_failures"] = sum(f is None for f in frames)
        # a failed position keeps hash 0 and is ignored by the comparison (see _near_duplicates)
        row["phash"] = [phash(f) if f is not None else 0 for f in frames[1:]]
        if row["decode_failures"] == len(frames):
            raise MediaError("undecodable", "no frame could be decoded")
        if row["decode_failures"]:
            reasons.append("decode_errors")

        reasons += self._thresholds(row)
        if reasons:
            row["status"] = "rejected"
            row["reasons"] = reasons

    def _thresholds(self, row: dict) -> list[str]:
        r = []
        fps = row["avg_fps"] or row["real_fps"] or 0.0
        if fps < self.min_fps:
            r.append("low_fps")
        if self.reject_vfr and row["vfr"]:
            r.append("vfr")
        if min(row["width"] or 0, row["height"] or 0) < self.min_short_side:
            r.append("low_resolution")
        if row["video_duration_s"] < self.min_duration:
            r.append("too_short")
        if row["video_duration_s"] > self.max_duration:
            r.append("too_long")
        if row["audio_codec"] is None:
            if self.require_audio:
                r.append("no_audio")
        elif row["audio_duration_s"] is None:
            r.append("empty_audio")
        else:
            if row["av_mismatch_s"] > self.max_av_mismatch:
                r.append("av_duration_mismatch")
            if abs(row["audio_start_s"] - row["video_start_s"]) > self.max_av_mismatch:
                r.append("av_offset")
        return r

    def finalize(self, rows: list[dict]) -> list[dict]:
        _exact_duplicates(rows)
        _near_duplicates([r for r in rows if r["status"] == "ok"], self.phash_threshold)
        return rows


def _mark_duplicate(row: dict, of: dict, code: str) -> None:
    row["status"] = "rejected"
    row["reasons"] = list(row["reasons"]) + [code]
    row["duplicate_of"] = of["id"]


def _exact_duplicates(rows: list[dict]) -> None:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["content_hash"]:
            groups.setdefault(r["content_hash"], []).append(r)
    for group in groups.values():
        if len(group) > 1:
            keep = min(group, key=lambda r: (r["status"] != "ok", r["path"]))
            for r in group:
                if r is not keep:
                    _mark_duplicate(r, keep, "duplicate")


def _near_duplicates(rows: list[dict], threshold: int) -> None:
    """Cluster rows whose durations agree and whose per-position hashes are close; keep the
    largest (pixels, fps, bytes) of each cluster."""
    rows = sorted((r for r in rows if r["phash"]), key=lambda r: r["video_duration_s"])
    if len(rows) < 2:
        return
    H = np.array([r["phash"] for r in rows], dtype=np.uint64)  # [N, P]
    valid = H != 0
    dur = np.array([r["video_duration_s"] for r in rows])
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(rows)):
        tol = max(0.5, 0.02 * dur[i])
        j_end = int(np.searchsorted(dur, dur[i] + tol, side="right"))
        if j_end <= i + 1:
            continue
        js = np.arange(i + 1, j_end)
        both = valid[i][None, :] & valid[js]  # [J, P]
        dist = hamming(H[i][None, :], H[js])  # [J, P]
        n = both.sum(1)
        mean = np.where(n > 0, (dist * both).sum(1) / np.maximum(n, 1), 64)
        for j in js[(n >= len(HASH_POSITIONS) // 2) & (mean <= threshold)]:
            parent[find(int(j))] = find(i)
    clusters: dict[int, list[dict]] = {}
    for i, r in enumerate(rows):
        clusters.setdefault(find(i), []).append(r)
    for group in clusters.values():
        if len(group) > 1:
            keep = min(group, key=lambda r: (-r["width"] * r["height"], -(r["avg_fps"] or 0), -r["size_bytes"],
                                             r["path"]))
            for r in group:
                if r is not keep:
                    _mark_duplicate(r, keep, "near_duplicate")
