"""`vidu eval`: score generated avatar video (stages/eval/). One mode per call: `--video` scores one
video against its reference image (stages/eval/video.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vidu_cli.options import Attention, Guidance, Guide, Kernels, Quiet, Recache, Sampler, Workdir, Workers, option
from vidu_cli.report import clean_errors, err, fail
from stages.eval.video import EvalOptions

Dir = Annotated[Optional[Path], typer.Option(show_default=False)]

SHOWN = (("identity", "identity (cosine, {identity_embedder})"), ("face_found", "face found (share of frames)"),
         ("sync_offset_frames", "sync offset (frames, + = audio late)"), ("sync_confidence", "sync confidence"),
         ("sync_distance", "sync distance"), ("sharpness", "sharpness (Laplacian var)"),
         ("face_sharpness", "face sharpness"), ("noise", "noise sigma"), ("blockiness", "blockiness (1 = none)"),
         ("flicker", "flicker (mean |luma change|)"), ("luma_flicker", "luma flicker"), ("exposure", "exposure (mean luma)"),
         ("clipped", "clipped pixels"), ("dover", "DOVER"))
AUDIO_SHOWN = (("envelope_r", "audio: envelope r with the driving speech ({envelope_fps:g} fps)"),
               ("envelope_r_control", "audio: envelope r with the driving speech rotated (control)"),
               ("envelope_lag_frames", "audio: envelope best lag (frames, + = generated late)"),
               ("wer_generated", "audio: word error rate, generated (vs {wer_reference})"),
               ("wer_driving", "audio: word error rate, driving (vs {wer_reference})"),
               ("transcript_generated", "audio: heard in the generated track"),
               ("transcript_driving", "audio: heard in the driving speech"),
               ("voice_similarity", "audio: voice similarity to {voice}"),
               ("voice_similarity_other", "audio: highest similarity to another voice"),
               ("voice_nearest", "audio: nearest voice"),
               ("edge_flux_ratio", "audio: spectral flux at chunk edges / elsewhere ({first_chunk_frames} + k x {chunk_frames} frames)"))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def score_table(scores: dict) -> Table:
    """The human view of one video's scores."""
    t = Table(title=f"{scores.get('video', 'video')}: {scores['frames']} frames, {scores['seconds']:.2f} s "
                    f"(sync: {scores['sync_method']})", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, label in SHOWN:
        t.add_row(label.format(**scores), _cell(scores.get(key)))
    drift = scores["drift"]
    for k in ("identity", "sharpness", "motion"):
        curve = ", ".join(_cell(v) for v in drift["curves"][k])
        t.add_row(f"drift of {k} (last vs first of {drift['segments']})", f"{_cell(drift[k])}  [{curve}]")
    ins = scores["instructions"]
    if isinstance(ins, dict):
        t.add_row(f"instructions ({ins['method']})", f"success rate {_cell(ins['success_rate'])} ({ins['events']} events)")
        if "spurious_per_min" in ins:
            t.add_row("spurious actions / min, latency (s)", f"{_cell(ins['spurious_per_min'])}, {_cell(ins['latency_s'])}")
    else:
        t.add_row("instructions", str(ins))
    gen = scores.get("generated_audio")
    if gen:
        for key, label in AUDIO_SHOWN:
            if key in gen:
                t.add_row(label.format(**gen), _cell(gen[key]))
    return t


def score_one(video: Path, reference: Path, audio: Path | None, instructions: Path | None, as_json: bool,
              options: EvalOptions, driving: Path | None = None, text: str | None = None, voice: str | None = None,
              chunk_frames: int = 12, first_chunk_frames: int | None = None) -> None:
    from stages.eval.video import load_wave, score_video

    for what, p in (("--video", video), ("--reference", reference), ("--audio", audio), ("--instructions", instructions),
                    ("--driving", driving)):
        if p is not None and not p.is_file():
            fail(f"{what} {p}: no such file")
    if driving is None and (text is not None or voice is not None):
        fail("--text and --voice score a generated audio track: give the speech that drove it with --driving")
    if voice is not None:
        from stages.synth.voice import VOICES
        if voice not in VOICES:
            fail(f"--voice {voice}: no such voice; voices: {', '.join(sorted(VOICES))}")
    gen_audio = None
    if driving is not None:  # the generated track and its driving speech, read before the (slow) video scoring
        from stages.eval.metrics.audio import score_generated
        gen_audio, drive = load_wave(video), load_wave(driving)
        for what, p, x in (("--video", video, gen_audio), ("--driving", driving, drive)):
            if len(x) == 0:
                fail(f"{what} {p}: no audio track to score")
        if not drive.any():
            fail(f"--driving {driving}: silent")
    scores = score_video(video, reference, audio, instructions, options)
    if gen_audio is not None:
        scores["generated_audio"] = score_generated(gen_audio, drive, text, voice, chunk_frames,
                                                      chunk_frames - 3 if first_chunk_frames is None else first_chunk_frames)
    if not scores["reference_face"]:
        err.print("warning: no face in the reference image: identity not scored", highlight=False)
    if as_json:
        typer.echo(json.dumps(scores))
    else:
        Console(soft_wrap=True).print(score_table(scores))


def eval(
    video: Annotated[Optional[Path], typer.Option("--video", help="Score this video file.", show_default=False)] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Reference image of the person (or a video: its first frame).", show_default=False)] = None,
    audio: Annotated[Optional[Path], typer.Option("--audio", help="Speech the video should follow (default: the video's own track).", show_default=False)] = None,
    instructions: Annotated[Optional[Path], typer.Option("--instructions", help="JSON events [{\"t\": s, \"action\" or \"text\": ...}] or a vidu synth truth .json.", show_default=False)] = None,
    driving: Annotated[Optional[Path], typer.Option("--driving", help="Speech that drove the generated audio track of --video (e.g. `vidu stream --audio-out generated`): score that track against it (envelope r, word error rate, voice similarity, chunk-edge flux).", show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="With --driving: what the driving speech says (word error rate against it; default: against the driving speech's transcript).", show_default=False)] = None,
    voice: Annotated[Optional[str], typer.Option("--voice", help="With --driving: the voice the track should have (a `vidu stream --voice` name): similarity to it vs the other voices.", show_default=False)] = None,
    chunk_frames: Annotated[int, typer.Option("--chunk-frames", min=4, help="With --driving: video frames per generated chunk, 4 x latent frames (chunk edges for the spectral-flux ratio; the starter: 12, tiny: 4).")] = 12,
    first_chunk_frames: Annotated[Optional[int], typer.Option("--first-chunk-frames", min=1, help="With --driving: video frames of the first chunk (default: --chunk-frames - 3, the stream's first latent frame decodes to one frame).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the table.")] = False,
    arcface: Annotated[Optional[Path], typer.Option("--arcface", help="Local ArcFace ONNX folder (identity embedder; needs onnxruntime).", show_default=False)] = None,
    syncnet: Annotated[Optional[Path], typer.Option("--syncnet", help="Local SyncNet weights (syncnet_v2.model of joonson/syncnet_python): lip sync by the SyncNet protocol instead of the proxy.", show_default=False)] = None,
    dover: Annotated[Optional[Path], typer.Option("--dover", help="DOVER's ONNX export (its convert_to_onnx.py), the .onnx file or its folder: dover (overall, 0-1), dover_aesthetic, dover_technical; needs onnxruntime.", show_default=False)] = None,
    judge: Annotated[Optional[Path], typer.Option("--judge", help="Local vision-language model folder judging instructions on real video.", show_default=False)] = None,
    segments: int = option(EvalOptions, "drift_segments", "Equal segments for the drift curves.", "--segments"),
    max_frames: int = option(EvalOptions, "max_frames", "At most this many frames of the 25 fps grid are scored.", "--max-frames"),
    max_side: int = option(EvalOptions, "max_side", "Analysis size: longer side in pixels.", "--max-side"),
    # benchmarks, comparisons and A/B (vidu_cli/eval_bench.py)
    runs: Annotated[Optional[list[str]], typer.Argument(help="Eval runs (id, prefix or manifest) for --compare / --ab.", show_default=False)] = None,
    bench: Annotated[Optional[str], typer.Option("--bench", help="Run a benchmark: synth | synth-idle (the synth cases untold: unprompted actions) | streambench | hdtf.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="streambench: a folder with samples.jsonl (default: built-in samples); hdtf: a folder of talking-head videos.", show_default=False)] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Checkpoint to benchmark, or 'oracle' (the ground-truth videos); default: the preset with random weights.", show_default=False)] = None,
    preset: Annotated[str, typer.Option("--preset", help="Architecture without --ckpt: tiny | small | wan2.1-1.3b.")] = "tiny",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many samples (generated benchmarks: 20 synth or synth-idle cases, 8 streambench samples).", show_default=False)] = None,
    seconds: Annotated[Optional[float], typer.Option("--seconds", help="Generated clip length (default 4 s); for folders, the most audio used per sample (default all).", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda (default: cuda when available).")] = "auto",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps per chunk (default: the checkpoint's).", show_default=False)] = None,
    sampler: Sampler = None,
    guidance: Guidance = None,
    guide: Guide = None,
    recache: Recache = None,
    kernels: Kernels = None,
    attention: Attention = "sdpa",
    decoder_weights: Annotated[Optional[Path], typer.Option("--decoder-weights", help="TAEHV weights (taew2_1.pth).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed of the streams.")] = 0,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the HTML report (index.html + PNG plots) into this folder.", show_default=False)] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Put the eval runs given as arguments side by side.")] = False,
    ab: Annotated[bool, typer.Option("--ab", help="Serve a blinded A/B page for the two runs given as arguments.")] = False,
    host: Annotated[str, typer.Option("--host", help="--ab: address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="--ab: port (0: any free one).")] = 8765,
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
) -> None:
    """Score generated avatar video: identity (face-embedding cosine to the reference), lip sync
    (SyncNet protocol fields from a named offline proxy), quality proxies (sharpness, noise,
    blockiness, flicker, exposure), drift over equal segments, and instruction following.

    Example: vidu eval --video gen.mp4 --reference ref.png --json | jq .identity
    Example: vidu eval --video gen.mp4 --reference ref.png --driving speech.wav --voice ada
    Example: vidu eval --bench synth --ckpt causal.safetensors --limit 20 --report report/
    Example: vidu eval --compare eval-1a2b eval-3c4d --report compare/
    Example: vidu eval --ab eval-1a2b eval-3c4d --port 8765
    """
    from vidu_cli import eval_bench
    eval_bench.check_modes(video is not None, bench, runs if compare else None, runs if ab else None)
    if runs and not (compare or ab):
        fail(f"unexpected argument {runs[0]!r}: runs are given with --compare or --ab")
    if bench or compare or ab:
        with clean_errors():
            if bench:
                return eval_bench.bench(bench, data, ckpt, preset, limit, workers, seconds, 256, device, steps, None,
                                        None, decoder_weights, None, arcface, seed, report, workdir, quiet,
                                        segments, judge, sampler=sampler, guidance=guidance, guide=guide,
                                        recache=recache, kernels=kernels, attention=attention)
            if compare:
                return eval_bench.compare(runs or [], report, workdir)
            return eval_bench.ab(runs[0], runs[1], host, port, seed, workdir)
    with clean_errors():
        options = EvalOptions(arcface=_s(arcface), syncnet=_s(syncnet), dover=_s(dover), judge=_s(judge),
                              drift_segments=segments, max_frames=max_frames, max_side=max_side)
        options.check()
        if video is not None:
            if reference is None:
                fail("--video needs --reference (the person's image)")
            return score_one(video, reference, audio, instructions, as_json, options, driving, text, voice, chunk_frames,
                             first_chunk_frames)
        fail("nothing to do: give --video VIDEO --reference IMAGE, --bench NAME, --compare RUN..., or --ab RUN_A RUN_B")


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)
