"""`vidu diarize`: speaker turns, on/off-screen speaker, overlap and speech cleanliness per clip;
also writes a segments manifest (one row per speech turn) next to the run's output."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from manifests.io import read_manifest, rows as table_rows, to_table, write_table
from stages.diarize import Diarize, load_pyannote, segment_rows
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers, option
from vidu_cli.report import clean_errors, err


def write_segments(manifest: Path, min_energy_ratio: float) -> Path:
    """The segments manifest of a finished diarize run: <workspace>/manifests/<run_id>-segments.parquet."""
    table, meta = read_manifest(manifest)
    out = manifest.parent / f"{meta['run_id']}-segments.parquet"
    rows = segment_rows(table_rows(table), min_energy_ratio)
    return write_table(to_table(rows, "segments"), out, {"kind": "segments", "stage": "diarize", "run_id": meta["run_id"]})


def diarize(
    from_: From = None,
    threshold: float = option(Diarize, "threshold", "Cosine distance at which speaker clusters stop merging."),
    num_speakers: Optional[int] = option(Diarize, "num_speakers", "Fixed number of speakers per clip (default: by threshold).", show_default=False),
    min_speaker_share: float = option(Diarize, "min_speaker_share", "A speaker needs this share of the speech (else folded into the nearest)."),
    min_sync: float = option(Diarize, "min_sync", "Mouth/speech sync z-score (against shifted audio) from which a speaker is onscreen."),
    min_energy_ratio: float = option(Diarize, "min_energy_ratio", "Least 300-3400 Hz energy share of a kept turn."),
    min_clean_speech: float = option(Diarize, "min_clean_speech", "Least kept speech (s) of a kept clip."),
    max_overlap: float = option(Diarize, "max_overlap", "Most seconds of two voices at once in a kept clip."),
    overlap_threshold: float = option(Diarize, "overlap_threshold", "The trained overlap detector's probability (two voices at once) from which a 10 ms frame can be overlap; a frame is overlap only where the embedding-spread heuristic flags it too."),
    overlap_peak: float = option(Diarize, "overlap_peak", "Hysteresis of the overlap detector: a run of frames over --overlap-threshold counts only where its (smoothed) probability reaches this somewhere; --overlap-peak 0 counts every run."),
    max_offscreen_share: float = option(Diarize, "max_offscreen_share", "Most share of the speech (outside overlap) offscreen in a kept clip."),
    vad_threshold: float = option(Diarize, "vad_threshold", "silero-vad speech probability threshold."),
    pyannote: Optional[Path] = option(Diarize, "pyannote", "Local pyannote.audio pipeline (folder with config.yaml) to use instead.", show_default=False),
    max_av_offset: int = option(Diarize, "max_av_offset", "Most audio-visual offset (frames at 25 fps, 3 = 120 ms; measured with vidu eval's lip-sync proxy) of a kept clip: a larger one, at --min-av-confidence or more, is rejected av_desync."),
    min_av_confidence: float = option(Diarize, "min_av_confidence", "Sync-curve confidence (peak over median) from which a measured A/V offset counts."),
    fix_av_offset: bool = option(Diarize, "fix_av_offset", "Keep av_desync clips instead, the measured lag recorded in av_shift_s (seconds the audio runs late) for the consumer to undo."),
    av_sync: bool = option(Diarize, "av_sync", "Measure each clip's A/V offset (about 1 s of CPU per second of speech); --no-av-sync leaves the av_ fields null and rejects nothing as av_desync.", "--av-sync/--no-av-sync"),
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
    executor: Executor = "local",
    ray_address: RayAddress = None,
) -> None:
    """Diarize clips: speaker turns, onscreen/offscreen speaker, overlap, speech-energy ratio, A/V offset.

    A clip is rejected (first that applies): no_speech, overlap, offscreen_speech, av_desync (audio
    off the lips by more than --max-av-offset frames, measured with vidu eval's lip-sync proxy; kept
    with its lag in av_shift_s under --fix-av-offset), too_little_speech.

    Example: vidu prefilter raw/ | vidu clip | vidu filter | vidu diarize --min-clean-speech 2
    """
    with clean_errors():
        if pyannote:
            load_pyannote(str(pyannote))  # fail early with one line
        stage = Diarize(threshold=threshold, num_speakers=num_speakers, min_speaker_share=min_speaker_share,
                        min_sync=min_sync, min_energy_ratio=min_energy_ratio, min_clean_speech=min_clean_speech,
                        max_overlap=max_overlap, overlap_threshold=overlap_threshold, overlap_peak=overlap_peak,
                        max_offscreen_share=max_offscreen_share,
                        vad_threshold=vad_threshold, pyannote=str(pyannote.resolve()) if pyannote else None,
                        max_av_offset=max_av_offset, min_av_confidence=min_av_confidence, fix_av_offset=fix_av_offset,
                        av_sync=av_sync)
        result = run_chain(stage, from_, workdir, workers, quiet, strict=False, executor=executor,
                           ray_address=ray_address)
        segments = write_segments(result.path, min_energy_ratio)
        if not quiet:
            err.print(f"segments: {segments}", highlight=False)
        if strict and (result.counts.get("rejected", 0) or result.counts.get("error", 0)):
            raise typer.Exit(1)
