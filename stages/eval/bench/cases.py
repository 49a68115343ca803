"""Benchmark samples: each is a reference image, speech and timed instructions (and, where the
benchmark has one, a ground-truth video). The `BenchSamples` stage writes them as a "bench_samples"
manifest (16 kHz wav audio, png references under <workspace>/bench/<bench>/), one item per sample:

- synth: held-out cases of the synthetic avatar world with ground truth. Case i is
  `stages.synth.make_sample(HELD_OUT_BASE + i, split="eval")` (held-out voices and texts). Training never draws these seeds: `vidu train`
  renders clip i of its run as seed `train_seed * 1_000_003 + i` (stages/train/data.py) and
  `vidu synth` draws 32-bit seeds (stages.synth.sample_seed), both far below 2**62 for any train
  seed under 4.6e12. The mismatched-audio control of case i is the speech of seed
  CONTROL_BASE + j, the first j >= i whose clip has speech.
- synth-idle: the synth cases with their instructions taken out (the same characters, scenes and
  speech; the neutral prompt throughout): instruction-free streams, on which every action the detectors
  read is an unprompted one (spurious per minute, the teachers issue's "instruction-free streams" bound).
- streambench (the paper's format: an action instruction, a reference first frame, an audio clip):
  a user's folder DIR with DIR/samples.jsonl, one JSON object a line:
      {"id": "s01", "image": "refs/a.png", "audio": "speech/a.wav", "instruction": "raise a hand",
       "at": 1.0, "until": 2.5, "video": "gt/a.mp4"}
  paths relative to DIR; "id" defaults to the line number, "at" (instruction onset, s) to 0,
  "until" to the end of the audio, "video" (a ground-truth video, used by the oracle system) to
  none. Without DIR, a built-in set is generated from the synthetic world: sample i is told at 0.3 s
  to perform action i mod 8 (stages.synth.ACTIONS), with ground truth (seeds BUILTIN_BASE + i).
  Generated samples' events are [onset, end, text]: the instruction is given at the onset and the
  ground-truth action starts stages.synth.world.INSTRUCTION_DELAY later.
- hdtf: an HDTF-style folder of talking-head videos (searched recursively): reference = the first
  frame, audio = the clip's own audio, ground truth = the clip; no instructions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from stages.run import Stage, base_row

IDLE_BENCH = "synth-idle"  # the synth cases untold
SYNTH_BENCHES = ("synth", IDLE_BENCH)
BENCHES = (*SYNTH_BENCHES, "streambench", "hdtf")
HELD_OUT_BASE = 2 ** 62  # synth case i: seed HELD_OUT_BASE + i (never used by training, see above)
CONTROL_BASE = HELD_OUT_BASE + 2 ** 40  # mismatched-audio controls
BUILTIN_BASE = HELD_OUT_BASE + 2 ** 41  # built-in streambench samples
VIDEO_EXT = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
FPS = 25


class BenchError(ValueError):
    """A benchmark that cannot be set up (one-line message)."""


# ---------------------------------------------------------------------------------------------
# items: what each benchmark's samples are, before any file is read

def synth_items(n: int, idle: bool = False) -> list[dict]:
    return [{"id": f"synth-{'idle-' * idle}{i:04d}", "kind": "synth", "index": i, **({"idle": True} if idle else {})}
            for i in range(n)]


def synth_case(index: int, size: int, seconds: float, idle: bool = False):
    """Synth case `index` (seed HELD_OUT_BASE + index, held-out voices and texts); `idle`: the same case
    with no instructions (synth-idle)."""
    from stages import synth
    return synth.make_sample(HELD_OUT_BASE + index, size, size, FPS, seconds, split="eval", events=[] if idle else None)


def builtin_items(n: int) -> list[dict]:
    return [{"id": f"streambench-builtin-{i:04d}", "kind": "builtin", "index": i} for i in range(n)]


def folder_items(folder: str | os.PathLike) -> list[dict]:
    """Items of a user's streambench folder (DIR/samples.jsonl); a bad line becomes an item whose
    row is rejected with the reason, never a crash."""
    d = Path(folder).expanduser().resolve()
    if not d.is_dir():
        raise BenchError(f"--data {d}: not a folder")
    index = d / "samples.jsonl"
    if not index.is_file():
        raise BenchError(f"{d} has no samples.jsonl (one JSON object a line: image, audio, instruction, at)")
    items, seen = [], set()
    for n, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
            if not isinstance(spec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            spec = {"error": f"samples.jsonl line {n}: not a JSON object ({e})"}
        sid = str(spec.get("id") or f"line{n:04d}")
        if sid in seen:
            spec = {"error": f"samples.jsonl line {n}: id {sid!r} is used twice"}
            sid = f"{sid}-line{n:04d}"
        seen.add(sid)
        items.append({"id": f"streambench-{sid}", "kind": "folder", "dir": str(d), "line": n, "spec": spec})
    if not items:
        raise BenchError(f"{index} lists no samples")
    return items


def hdtf_items(folder: str | os.PathLike) -> list[dict]:
    d = Path(folder).expanduser().resolve()
    if not d.is_dir():
        raise BenchError(f"--data {d}: not a folder")
    paths = sorted(p for p in d.rglob("*") if p.suffix.lower() in VIDEO_EXT and p.is_file())
    if not paths:
        raise BenchError(f"--data {d}: no videos ({', '.join(sorted(VIDEO_EXT))}) in it")
    return [{"id": f"hdtf-{p.relative_to(d).with_suffix('').as_posix().replace('/', '-')}", "kind": "hdtf",
             "path": str(p)} for p in paths]


def bench_items(bench: str, n: int, data: str | None) -> list[dict]:
    """The items of a benchmark: `n` generated cases, or the samples of the folder `data`."""
    if bench not in BENCHES:
        raise BenchError(f"unknown benchmark {bench!r}: choose one of {', '.join(BENCHES)}")
    if bench in SYNTH_BENCHES:
        if data:
            raise BenchError("--data is for streambench and hdtf; synth cases are generated")
        return synth_items(n, idle=bench == IDLE_BENCH)
    if bench == "hdtf":
        if not data:
            raise BenchError("--bench hdtf needs --data DIR (a folder of talking-head videos)")
        return hdtf_items(data)
    return folder_items(data) if data else builtin_items(n)


def fingerprint(items: list[dict]) -> list:
    """Content identity of the items: files by path, size and mtime."""
    out = []
    for it in items:
        files = [it["path"]] if "path" in it else []
        if it.get("kind") == "folder":
            files = [str(Path(it["dir"]) / "samples.jsonl")] + [str(Path(it["dir"]) / it["spec"][k])
                                                                 for k in ("image", "audio", "video")
                                                                 if isinstance(it["spec"].get(k), str)]
        stats = []
        for f in files:
            try:
                st = os.stat(f)
                stats.append([f, st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append([f, None])
        out.append([it["id"], stats])
    return out


# ---------------------------------------------------------------------------------------------
# writing one sample

def _write_wav(path: Path, wave: np.ndarray) -> None:
    from scipy.io import wavfile
    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
    tmp = path.with_name(f".{path.name}.partial")
    wavfile.write(tmp, 16000, pcm)
    os.replace(tmp, path)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image
    tmp = path.with_name(f".{path.stem}.partial.png")
    Image.fromarray(rgb).save(tmp)
    os.replace(tmp, path)


def _write_mp4(path: Path, frames: np.ndarray, wave: np.ndarray) -> None:
    from stages.sense.media import write_video
    tmp = path.with_name(f".{path.stem}.partial.mp4")
    write_video(tmp, frames, FPS, wave)
    os.replace(tmp, path)


def _with_speech(base: int, start: int, seconds: float) -> tuple[int, list[float]]:
    """The first seed base + j (j >= start) whose clip moves the mouth, and its mouth track."""
    from stages import synth
    for j in range(start, start + 64):
        s = synth.make_sample(base + j, 64, 64, FPS, seconds, split="eval")
        if np.std(s.tracks["mouth"]) > 0.05:  # speech that moves the mouth within the clip
            return base + j, [round(float(x), 4) for x in s.tracks["mouth"]]
    raise BenchError("no speaking control case found")  # 64 silent clips in a row: p = 1e-64


def builtin_sample(index: int, size: int, seconds: float):
    """Built-in streambench sample `index`: a synth-world character who talks (held-out voices and
    texts) and is told to perform action index mod 8 at 0.3 s (its action starts INSTRUCTION_DELAY
    later, as long as the clip allows)."""
    from stages.synth.dataset import render_sample
    from stages.synth.speech import speak
    from stages.synth.world import ACTIONS, INSTRUCTION_DELAY, event, frame_count, random_identity, random_scene
    seed = BUILTIN_BASE + index
    r_id, r_scene, r_speech, r_motion = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    identity = random_identity(r_id)
    scene = random_scene(r_scene, identity)
    T = frame_count(seconds, FPS)
    name = list(ACTIONS)[index % len(ACTIONS)]
    end = min(0.3 + float(np.mean(ACTIONS[name].seconds)), T / FPS)  # told at 0.3 s, done by then + the mean length
    e = event(0.3, name, end - 0.3 - INSTRUCTION_DELAY)
    events = [e] if e.end - e.start >= 0.3 else []
    return render_sample(seed, identity, scene, speak(r_speech, T / FPS, "eval"), events, T, r_motion, size, size, FPS)


@dataclass
class BenchSamples(Stage):
    """Index one benchmark's samples into a bench_samples manifest (files under `out_dir`)."""

    name: ClassVar[str] = "bench_samples"
    kind: ClassVar[str] = "bench_samples"
    version: ClassVar[str] = "1"
    reads: ClassVar[tuple[str, ...]] = ("id",)
    writes: ClassVar[tuple[str, ...]] = ("bench", "image", "audio", "instruction", "events", "video", "truth",
                                         "seed", "control_seed", "seconds", "source")

    bench: str = "synth"
    out_dir: str = "bench"
    size: int = 256  # synth / built-in frame size (stages.synth.analyze is calibrated at 256)
    seconds: float = 4.0  # generated clip length; for hdtf and folders, audio beyond this is cut (0: keep all)

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("bench_samples", id=item["id"], bench=self.bench, source=item.get("path") or item.get("dir"))

    def process(self, item: dict) -> list[dict]:
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if item["kind"] in ("synth", "builtin"):
            return [self._generated(item, out)]
        if item["kind"] == "hdtf":
            return [self._hdtf(item, out)]
        return [self._folder(item, out)]

    def _generated(self, item: dict, out: Path) -> dict:
        from stages import synth
        i = item["index"]
        if item["kind"] == "synth":
            s = synth_case(i, self.size, self.seconds, bool(item.get("idle")))
        else:
            s = builtin_sample(i, self.size, self.seconds)
        control_seed, control_mouth = _with_speech(CONTROL_BASE, i, s.frames.shape[0] / FPS)
        ref = synth.render(s.identity, synth.State(), self.size, self.size, s.scene)  # neutral pose, as in training
        stem = out / item["id"]
        _write_png(stem.with_suffix(".png"), ref)
        _write_wav(stem.with_suffix(".wav"), s.audio)
        _write_mp4(stem.with_suffix(".mp4"), s.frames, s.audio)
        truth = s.truth()
        truth["control_mouth"] = control_mouth
        tmp = stem.with_name(f".{item['id']}.partial.json")
        tmp.write_text(json.dumps(truth))
        os.replace(tmp, stem.with_suffix(".json"))
        return base_row("bench_samples", id=item["id"], bench=self.bench, image=str(stem.with_suffix(".png")),
                        audio=str(stem.with_suffix(".wav")), instruction=s.events[0].text if s.events else "",
                        events=json.dumps([list(a) for a in s.actions]), video=str(stem.with_suffix(".mp4")),
                        truth=str(stem.with_suffix(".json")), seed=s.seed, control_seed=control_seed,
                        seconds=len(s.audio) / 16000, source="builtin" if item["kind"] == "builtin" else "synth")

    def _cut(self, wave: np.ndarray) -> np.ndarray:
        return wave[: int(round(self.seconds * 16000))] if self.seconds > 0 else wave

    def _hdtf(self, item: dict, out: Path) -> dict:
        from stages.sense.media import MediaError, clip_frames, load_audio
        row = base_row("bench_samples", id=item["id"], bench=self.bench, source=item["path"], video=item["path"],
                       instruction="", events="[]")
        try:
            frames, _ = clip_frames(item["path"], 0.0, 0.5)
            wave = load_audio(item["path"], 16000)
        except MediaError as e:
            return {**row, "status": "rejected", "reasons": ["unreadable"], "error": str(e)}
        if len(frames) == 0:
            return {**row, "status": "rejected", "reasons": ["no_video"]}
        if len(wave) < 16000 * 0.5:
            return {**row, "status": "rejected", "reasons": ["no_audio"]}
        stem = out / item["id"]
        _write_png(stem.with_suffix(".png"), frames[0])
        wave = self._cut(wave)
        _write_wav(stem.with_suffix(".wav"), wave)
        return {**row, "image": str(stem.with_suffix(".png")), "audio": str(stem.with_suffix(".wav")),
                "seconds": len(wave) / 16000}

    def _folder(self, item: dict, out: Path) -> dict:
        from stages.sense.image import ImageError, read_image
        from stages.sense.media import MediaError, load_audio
        spec, d = item["spec"], Path(item["dir"])
        row = base_row("bench_samples", id=item["id"], bench=self.bench, source=f"{d / 'samples.jsonl'}:{item['line']}")
        if "error" in spec:
            return {**row, "status": "rejected", "reasons": ["bad_line"], "error": spec["error"]}
        missing = [k for k in ("image", "audio", "instruction") if not isinstance(spec.get(k), str)]
        if missing:
            return {**row, "status": "rejected", "reasons": ["missing_field"],
                    "error": f"line {item['line']}: no {', '.join(missing)}"}
        image, audio = d / spec["image"], d / spec["audio"]
        video = d / spec["video"] if isinstance(spec.get("video"), str) else None
        for p, code in ((image, "image_missing"), (audio, "audio_missing"), (video, "video_missing")):
            if p is not None and not p.is_file():
                return {**row, "status": "rejected", "reasons": [code], "error": f"{p}: no such file"}
        try:
            rgb = read_image(image)
        except ImageError as e:
            return {**row, "status": "rejected", "reasons": ["image_unreadable"], "error": str(e)}
        try:
            wave = self._cut(load_audio(audio, 16000))
        except (MediaError, Exception) as e:  # av.error.* on damaged streams
            return {**row, "status": "rejected", "reasons": ["audio_unreadable"], "error": f"{audio}: {e}"}
        if len(wave) < 16000 * 0.2:
            return {**row, "status": "rejected", "reasons": ["audio_too_short"], "error": f"{audio}: under 0.2 s"}
        try:
            at = float(spec.get("at", 0.0))
            until = float(spec.get("until", len(wave) / 16000))
        except (TypeError, ValueError):
            return {**row, "status": "rejected", "reasons": ["bad_time"], "error": "at / until must be seconds"}
        stem = out / item["id"]
        _write_png(stem.with_suffix(".png"), rgb)
        _write_wav(stem.with_suffix(".wav"), wave)
        events = [[at, until, spec["instruction"]]] if spec["instruction"] else []
        return {**row, "image": str(stem.with_suffix(".png")), "audio": str(stem.with_suffix(".wav")),
                "instruction": spec["instruction"], "events": json.dumps(events),
                "video": str(video) if video else None, "seconds": len(wave) / 16000}
