"""The voice bench (issue 19): does a content model (audio_encoder "content", e.g. preset tiny-voice) say
what it hears, in the voice it is told, rather than in the voice that said it?

Case i: a held-out clip of the synthetic world (seed VOICE_BASE + i, eval-split texts, no instructions)
said by one character voice, the driving voice (stages.synth.voice.VOICES, sorted, i mod 8), and told
another (i + TOLD_SHIFT mod 8: never its own). The model hears the driving speech's content (`content_rows`
of its TTS truth: phones and loudness, no timbre). A stage-1 (bidirectional) teacher samples the clip whole
(stages/train/sample.py `sample_bidirectional`, the told voice in both guidance passes) and its joint audio goes
through the shipped vocoder (models/vocoder.py); a streaming model (stage 2, a student) is streamed as `vidu
stream --say ... --voice TOLD --audio-out generated` streams it (`voice_stream`: stages.stream.session's chunk
loop, ContentStream's rows, the vocoder streamed chunk by chunk). The track is scored against the driving speech
by stages/eval/metrics/audio.py `score_generated`: envelope r (and its mismatched control), word error rate
against the said text (pocketsphinx), voice similarity to the told voice against every other voice, the driving
one included, and for a stream the spectral flux at its chunk edges against elsewhere (a click reads > 1).
The video said with it is measured from its pixels (stages.synth.analyze, knowing only who the character is):
`mouth_r` = the synth bench's lip sync (the mouth opening against the ground-truth mouth track of the driving
speech), and the pair's own sync (`pair_sync`: the mouth against the generated audio's envelope; its offset in
frames, positive = audio late). `oracle_row` scores the driving speech itself the same way (told its own voice,
its ground-truth mouth track as the video): what the scorers read on real speech of these voices (envelope r
1, the driving voice nearest) and on a pair in sync."""
from __future__ import annotations

import numpy as np
import torch

from stages.eval.bench.cases import HELD_OUT_BASE

VOICE_BASE = HELD_OUT_BASE + 3 * 2 ** 40     # voice case i: seed VOICE_BASE + i (apart from the synth bench's)
TOLD_SHIFT = 3


def case_voices(i: int) -> tuple[str, str]:
    """(driving voice, told voice) of case i."""
    from stages.synth.voice import VOICES
    names = sorted(VOICES)
    return names[i % len(names)], names[(i + TOLD_SHIFT) % len(names)]


def real_case(path, i: int, cfg, seconds: float | None = None) -> dict:
    """A real recording re-voiced (`--real`): its first `seconds` of speech (whole latent frames; default all)
    heard through the streaming front end (content(wave, "blocks"): pocketsphinx's phone loop, what `vidu
    stream --audio` reads), said by voice case i's character in case i's told voice. No text (its WER is
    against the recording's own transcript) and no ground-truth mouth (the pair's sync is measured)."""
    from pathlib import Path

    from stages.sense import content as C
    from stages.sense.media import load_audio
    from stages.synth import State, render
    from stages.synth.dataset import character
    wave = load_audio(path, C.SR)[:None if seconds is None else int(seconds * C.SR)]
    per, hop = cfg.audio.video_frames_per_latent, C.SR // cfg.audio.fps     # video frames a latent frame, samples a frame
    F = 1 + (len(wave) // hop - 1) // per
    if F < 2 or not np.any(wave):
        raise ValueError(f"{path}: no speech to re-voice (at least {(per + 1) / cfg.audio.fps:.2f} s of sound)")
    T = 1 + per * (F - 1)
    wave = np.asarray(wave[:T * hop], np.float32)
    before, after = cfg.dit.audio_context
    c = C.content(wave, "blocks")
    identity, scene = character(VOICE_BASE + i)
    return {"index": i, "seed": VOICE_BASE + i, "driving": f"real:{Path(path).name}", "told": case_voices(i)[1],
            "audio": wave, "text": None, "phones": None, "latent_frames": F, "video_frames": T, "frames_per_latent": per,
            "identity": identity, "mouth_truth": None, "rows": C.latent_rows(c["phone"], c["loud"], before + F + after, before),
            "ref": render(identity, State(), cfg.width, cfg.height, scene)}


def bench_cases(cfg, cases: int, seconds: float, real: list | None = None) -> list[dict]:
    """The bench's cases: voice cases 0..cases-1, or the recordings `real` re-voiced (real_case)."""
    if real:
        return [real_case(path, i, cfg, seconds) for i, path in enumerate(real)]
    return [voice_case(i, cfg, seconds) for i in range(cases)]


def voice_case(i: int, cfg, seconds: float) -> dict:
    """Case i for the content model `cfg`: the driving speech ("audio", "text"), its content rows ("rows",
    on the latent timeline of the clip's "latent_frames"), the character's neutral reference image ("ref")."""
    from stages import synth
    from stages.synth.dataset import SPEECH_MIN_S
    from stages.synth.voice import VOICES
    from stages.train.data import content_rows
    if seconds < SPEECH_MIN_S:            # shorter clips are windows cut from longer speech: not all of the text is said
        raise ValueError(f"voice cases are at least {SPEECH_MIN_S:g} s (whole sentences), not {seconds:g}")
    driving, told = case_voices(i)
    s = synth.make_sample(VOICE_BASE + i, width=cfg.width, height=cfg.height, fps=cfg.audio.fps, seconds=seconds,
                          split="eval", events=[], voice=VOICES[driving], draw=False)   # speech, not pixels
    F = 1 + (s.frames.shape[0] - 1) // cfg.audio.video_frames_per_latent
    return {"index": i, "seed": VOICE_BASE + i, "driving": driving, "told": told, "audio": s.audio, "text": s.said.text,
            "phones": s.said.phones, "latent_frames": F, "video_frames": s.frames.shape[0],
            "frames_per_latent": cfg.audio.video_frames_per_latent, "identity": s.identity,
            "mouth_truth": np.asarray(s.tracks["mouth"], np.float64),
            "rows": content_rows(s.audio, s.said.phones, cfg.replace(latent_frames=F)),
            "ref": synth.render(s.identity, synth.State(), cfg.width, cfg.height, s.scene)}


@torch.no_grad()
def voice_sample(model, cfg, codec, vocoder, encode_text, case: dict, voice: str, seed: int = 0,
                 **how) -> tuple[np.ndarray, np.ndarray]:
    """The model's joint audio for `case` said in `voice`, through the vocoder (16 kHz float32, the length of
    the driving speech), and the video with it ([T, H, W, 3] uint8, the case's frames). `how`:
    sample_bidirectional's steps, shift, guidance and guide (stages/train/sample.py `whole_settings`: the
    checkpoint's record)."""
    from models.audio import latent_to_logmel
    from models.config import NEUTRAL_TEXT
    from models.encoders import reference_latent
    from stages.synth.voice import voice_index
    from stages.train.data import fit_text
    from stages.train.sample import decode_video, sample_bidirectional
    _check_voices(cfg)
    dev = next(model.parameters()).device
    ref = reference_latent(codec, case["ref"], cfg.height, cfg.width).float().to(dev)
    text = fit_text(torch.as_tensor(encode_text([NEUTRAL_TEXT])[0]).float(), cfg.dit.text_len)[None].to(dev)
    z, audio = sample_bidirectional(model, cfg, ref, text, case["rows"][None].to(dev), frames=case["latent_frames"],
                                    seed=seed, voice=torch.tensor([voice_index(voice)], device=dev), **how)
    return (_as_long_as(vocoder.synthesize(latent_to_logmel(audio[0].float().cpu(), cfg.audio)).numpy(), case),
            decode_video(codec, z, case["video_frames"]))


def _check_voices(cfg) -> None:
    if not cfg.dit.voices:
        raise ValueError(f"preset {cfg.name} has no voices (DiTConfig.voices): the voice bench needs a voice model")


def _as_long_as(wave: np.ndarray, case: dict) -> np.ndarray:
    """`wave` cut or padded with silence to the length of the case's driving speech, float32."""
    n = len(case["audio"])
    return np.pad(wave[:n], (0, max(0, n - len(wave)))).astype(np.float32)


@torch.no_grad()
def voice_stream(model, cfg, codec, encode_text, case: dict, voice: str, settings,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The joint audio of `case` streamed in `voice` as `vidu stream` streams it (`settings`: a StreamSettings):
    the case's speech fed with its TTS truth's phones, the generated audio through the shipped vocoder chunk by
    chunk (16 kHz float32, the length of the driving speech), and the video streamed with it (voice_sample's)."""
    from models.encoders import reference_latent
    from stages.stream.engine import StreamEngine
    from stages.stream.events import AudioChunk, AudioEnd, EventQueue
    from stages.stream.session import Parts, Session, SessionOptions
    from stages.synth.voice import voice_index
    _check_voices(cfg)
    p = next(model.parameters())
    engine = StreamEngine(model, cfg, settings, seed=seed, keep_text=True)
    engine.start(reference_latent(codec, case["ref"], cfg.height, cfg.width).to(p.device, p.dtype), voice_index(voice))
    events = EventQueue()
    events.put(AudioChunk(np.asarray(case["audio"], np.float32)))
    events.put(AudioEnd())
    s = Session(Parts(engine, cfg, codec, encode_text), events, SessionOptions(audio_out="generated", phones=case["phones"]))
    said, shown = [], []
    while not s.finished():
        frames, audio, _ = s.next_chunk()
        said.append(audio)
        shown.append(frames)
    return _as_long_as(np.concatenate(said), case), np.concatenate(shown)[:case["video_frames"]]


def score_case(generated: np.ndarray, case: dict, voice: str, chunk_frames: int | None = None,
               mouth: np.ndarray | None = None, control: np.ndarray | None = None) -> dict:
    """`score_generated` of a track against the case's driving speech and text, told `voice`; `chunk_frames`:
    a stream's latent frames per chunk (its edges' flux is scored; None: a whole clip, no edges); `mouth`: the
    mouth track measured on the video said with it (its lip sync and the pair's sync are scored); `control`:
    another case's ground-truth mouth track (the lip-sync control, `mouth_r_control`). A case whose driving
    speech is silent is a row with its reason."""
    from stages.eval.bench.synthscore import pearson
    from stages.eval.metrics.audio import pair_sync, score_generated
    row = {k: case[k] for k in ("index", "seed", "driving", "told", "text")}
    if not np.any(case["audio"]) or case["text"] == "":
        return {**row, "skipped": "the driving clip is silent"}
    per = case["frames_per_latent"]             # video frames per latent frame; the first chunk's first has one
    edges = {"chunk_frames": per * chunk_frames, "first_frames": per * chunk_frames - per + 1} if chunk_frames else \
        {"chunk_frames": None}
    row.update(score_generated(generated, case["audio"], text=case["text"], voice=voice, **edges))
    if mouth is not None:
        measured = np.nan_to_num(np.asarray(mouth, np.float64))
        for key, truth in (("mouth_r", case["mouth_truth"]), ("mouth_r_control", control)):
            if truth is not None and case["mouth_truth"] is not None:
                n = min(len(measured), len(truth))
                row[key] = pearson(measured[:n], np.asarray(truth, np.float64)[:n])
        row.update(pair_sync(mouth, generated))
    return row


def oracle_row(case: dict, control: np.ndarray | None = None) -> dict:
    """The driving speech scored as if generated, told its own voice, its ground-truth mouth track as the video's:
    the scorers' reading of real speech and of a pair in sync (a real recording: no voice of the 8, no mouth)."""
    from stages.synth.voice import VOICES
    own = case["driving"] if case["driving"] in VOICES else None
    return score_case(case["audio"], {**case, "told": own}, own, mouth=case["mouth_truth"], control=control)


def voice_waves(model, cfg, codec, vocoder, encode_text, cases: list[dict], stream=None,
                **how) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The model's joint audio of `cases` (bench_cases), each said in its told voice, and the mouth opening
    measured on the video with it ([T] per frame, NaN where no face is found): streamed with `stream` (a
    StreamSettings: voice_stream), else sampled whole (`how`: voice_sample's)."""
    from stages.synth import analyze
    waves, mouths = [], []
    for i, case in enumerate(cases):
        wave, frames = (voice_stream(model, cfg, codec, encode_text, case, case["told"], stream, seed=i) if stream is not None
                        else voice_sample(model, cfg, codec, vocoder, encode_text, case, case["told"], seed=i, **how))
        waves.append(wave)
        mouths.append(np.asarray(analyze(frames, case["identity"])["mouth"], np.float32))
    return waves, mouths


def score_waves(waves: list[np.ndarray], cfg, seconds: float, chunk_frames: int | None = None,
                mouths: list[np.ndarray] | None = None, real: list | None = None) -> dict:
    """The model's waves (and the mouth tracks of its video, when given) scored against their cases' driving
    speech (bench_cases, made again: the world and its TTS are functions of the seed, `real` the recordings;
    `chunk_frames`: streamed in chunks of that many latent frames), and the oracle's rows: {"summary",
    "oracle", "rows", "oracle_rows"}."""
    rows, oracle = [], []
    cases = bench_cases(cfg, len(waves), seconds, real)
    for i, (wave, case) in enumerate(zip(waves, cases, strict=True)):
        other = cases[(i + 1) % len(cases)]["mouth_truth"] if len(cases) > 1 else None    # the lip-sync control
        rows.append(score_case(np.asarray(wave, np.float32), case, case["told"], chunk_frames,
                               None if mouths is None else mouths[i], other))
        oracle.append(oracle_row(case, other))
    return {"summary": summarise(rows), "oracle": summarise(oracle), "rows": rows, "oracle_rows": oracle}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarise(rows: list[dict]) -> dict:
    """Means over the scored rows (the pair's offset: the median); the shares of rows whose nearest voice is
    the told one / the driving one, and whose pair is in sync (|offset| <= 1 frame)."""
    scored = [r for r in rows if "skipped" not in r]
    voiced = [r for r in scored if r.get("voice_nearest")]
    return {"cases": len(rows), "scored": len(scored),
            **{k: _mean(r.get(k) for r in scored) for k in ("envelope_r", "envelope_r_control", "wer_generated", "wer_driving",
                                                            "voice_similarity", "voice_similarity_other", "edge_flux_ratio",
                                                            "mouth_r", "mouth_r_control", "av_r")},
            "av_offset_frames": _median(r.get("av_offset_frames") for r in scored),
            "av_in_sync": _mean(float(abs(r["av_offset_frames"]) <= 1) for r in scored if r.get("av_offset_frames") is not None),
            "nearest_is_told": _mean(float(r["voice_nearest"] == r["told"]) for r in voiced),
            "nearest_is_driving": _mean(float(r["voice_nearest"] == r["driving"]) for r in voiced)}


def table(model: dict, oracle: dict) -> str:
    """The bench's markdown table: the model's summary, and the oracle's."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| track | envelope r (control) | WER generated / driving | similarity told / best other | nearest = told / driving "
             "| chunk-edge flux / elsewhere | video lip sync r (control) | pair sync r, offset median / in sync |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in (("model", model), ("oracle (the driving speech)", oracle)):
        lines.append(f"| {name} | {f(s['envelope_r'])} ({f(s['envelope_r_control'])}) | {f(s['wer_generated'])} / "
                     f"{f(s['wer_driving'])} | {f(s['voice_similarity'])} / {f(s['voice_similarity_other'])} | "
                     f"{f(s['nearest_is_told'])} / {f(s['nearest_is_driving'])} | {f(s.get('edge_flux_ratio'))} | "
                     f"{f(s.get('mouth_r'))} ({f(s.get('mouth_r_control'))}) | {f(s.get('av_r'))}, "
                     f"{f(s.get('av_offset_frames'))} / {f(s.get('av_in_sync'))} |")
    return "\n".join(lines)


def generate(ckpt, codec_path, cases: int, seconds: float, steps: int | None = None, guidance: float | None = None,
             guide: str | None = None, real: list | None = None) -> dict:
    """The model's waves on a checkpoint with its autoencoder file, on the GPU when there is one (the sampling
    settings asked for, else the checkpoint's record): sampled whole for a stage-1 teacher, streamed for any
    other (`voice_stream` at its recorded stream settings): what `score_waves` scores, here or on another machine
    (`save_waves`: the GPU image lacks the scorers' packages)."""
    from models.checkpoint import checkpoint_sampling, load_dit, load_taehv
    from models.encoders import text_encoder
    from models.vocoder import load as load_vocoder
    from stages.train.sample import whole_settings
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_dit(ckpt, device=dev)
    model.eval()
    trained = checkpoint_sampling(ckpt)
    encode = text_encoder("minilm", max_len=cfg.dit.text_len)
    real = [str(p) for p in real] if real else None
    todo = bench_cases(cfg, cases, seconds, real)
    common = {"preset": cfg.name, "cases": len(todo), "seconds": seconds, "real": real, "device": dev}
    if (trained or {}).get("stage") == "bidirectional":
        how = whole_settings(trained, steps, guidance, guide)
        waves, mouths = voice_waves(model, cfg, load_taehv(codec_path, dev), load_vocoder(), encode, todo, **how)
        return {**common, "sampling": how, "waves": waves, "mouths": mouths}
    import dataclasses

    from stages.stream.engine import StreamSettings
    st = StreamSettings.resolve(cfg, trained, steps=steps, guidance=guidance, guide=guide)
    waves, mouths = voice_waves(model, cfg, load_taehv(codec_path, dev), None, encode, todo, stream=st)
    return {**common, "sampling": {"streamed": dataclasses.asdict(st)}, "chunk_frames": st.chunk_frames, "waves": waves,
            "mouths": mouths}


def save_waves(path, res: dict) -> None:
    """`generate`'s waves (float32, as scored: 16 cases x 8 s are ~8 MB), the mouth tracks of its video and
    its settings in one .npz."""
    import json
    tracks = {"wave": res["waves"], "mouth": res.get("mouths") or []}
    np.savez_compressed(path, meta=np.array(json.dumps({k: v for k, v in res.items() if k not in ("waves", "mouths")})),
                        **{f"{name}{i}": np.asarray(x, np.float32) for name, xs in tracks.items() for i, x in enumerate(xs)})


def load_waves(path) -> dict:
    """save_waves' result; "mouths" None in a file written before the video was measured."""
    import json
    with np.load(path) as z:
        res = json.loads(str(z["meta"]))
        res["waves"] = [z[f"wave{i}"] for i in range(res["cases"])]
        res["mouths"] = [z[f"mouth{i}"] for i in range(res["cases"])] if "mouth0" in z else None
    return res


def scored(res: dict) -> dict:
    """`generate`'s result (or `load_waves`') with its scores (score_waves), the waves and mouths left out."""
    from models.config import preset
    return {**{k: v for k, v in res.items() if k not in ("waves", "mouths")},
            **score_waves(res["waves"], preset(res["preset"]), res["seconds"], res.get("chunk_frames"), res.get("mouths"),
                          res.get("real"))}


def scorers_missing() -> str | None:
    """The scorers' packages this machine lacks (resemblyzer, pocketsphinx), or None."""
    import importlib.util
    missing = [m for m in ("resemblyzer", "pocketsphinx") if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None
