"""Measure issue 19's foundation on CPU: the content representation (stages/sense/content.py), its
timbre leak (the speaker probe of stages/synth/voice.py), the real-speech front end against the espeak
truth, and the vocoder's chunk edges (models/vocoder.py) against per-chunk Griffin-Lim.

    python benchmarks/voice_foundation.py [--texts 120] [--agree 48] [--media ../shared/media] [--vocoder PATH]

Prints a markdown section for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from stages.sense import content as C
from stages.synth import speech as S
from stages.synth import voice as V


def probe_rows(corpus: list, voices: list[str], texts: list[str]) -> dict:
    y = np.array([voices.index(u.voice) for u in corpus])
    g = np.array([texts.index(u.text) for u in corpus])
    X = {"phones + loudness": [V.pooled(C.features(u.phone, u.loud)) for u in corpus],
         "phones": [V.pooled(C.features(u.phone, 0 * u.loud)) for u in corpus],
         "loudness": [V.pooled(u.loud[:, None]) for u in corpus],
         "log-mel (control)": [V.pooled(V.log_mel(u.audio)) for u in corpus]}
    return {k: V.probe_folds(np.stack(x), y, g) for k, x in X.items()}


def agreement(truth: np.ndarray, est: np.ndarray) -> tuple[float, float, float]:
    """Step agreement: phone, viseme, speech/silence."""
    vis = np.array([C.VISEMES.index(C.VISEME_OF[p]) for p in C.PHONES])
    return float(np.mean(truth == est)), float(np.mean(vis[truth] == vis[est])), float(np.mean((truth > 0) == (est > 0)))


def front_end(n: int, split: str, methods=("allphone", "words")) -> dict:
    """Agreement of the front ends with the espeak truth on `n` en-us utterances of `split` voices/texts."""
    rng = np.random.default_rng(7)
    pool = [v for v in S.voices(split) if v.startswith("en-us+")]
    texts = S.texts(split)
    out = {m: [] for m in methods} | {m + " +0.3 s": [] for m in methods}
    secs = {m: 0.0 for m in methods}
    audio_s = 0.0
    for i in range(n):
        u = S.tts(texts[i % len(texts)], pool[rng.integers(len(pool))], int(rng.integers(120, 231)),
                  int(rng.integers(20, 81)), int(rng.integers(20, 91)))
        audio_s += len(u.audio) / S.SR
        T = C.steps_for(len(u.audio))
        truth = C.phone_steps(C.from_espeak(u.phonemes), T)
        for m in methods:
            t0 = time.process_time()
            segs = C.recognise(u.audio, m)
            secs[m] += time.process_time() - t0
            out[m].append(agreement(truth, C.phone_steps(segs, T)))
            out[m + " +0.3 s"].append(agreement(truth, C.phone_steps([(p, a + 0.3, b + 0.3) for p, a, b in segs], T)))
    return {k: np.mean(v, 0) for k, v in out.items()} | {"cpu_x_real_time " + m: secs[m] / audio_s for m in methods}


def real_speech(media: Path) -> list[tuple]:
    """Per real recording: seconds, VAD speech s, share of VAD-speech steps the front end calls speech,
    share of non-speech steps it calls SIL, phones per speech second, and words-vs-allphone agreement."""
    from stages.sense.media import load_audio
    from stages.sense.speech import load_vad, speech_segments

    vad = load_vad()
    files = sorted((media / "speech").glob("*.wav")) + sorted((media / "talking").glob("*.mp4"))
    rows = []
    for f in files:
        audio = load_audio(f, C.SR)
        T = C.steps_for(len(audio))
        regions = speech_segments(vad, audio)
        vad_mask = C.phone_steps([("AA", a, b) for a, b in regions], T) > 0
        res = {}
        for m in ("allphone", "words"):
            segs = C.recognise(audio, m)
            ph = C.phone_steps(segs, T)
            changes = int(np.sum(np.diff(ph[vad_mask]) != 0)) + 1 if vad_mask.any() else 0
            res[m] = (ph, float(np.mean(ph[vad_mask] > 0)) if vad_mask.any() else float("nan"),
                      float(np.mean(ph[~vad_mask] == 0)) if (~vad_mask).any() else float("nan"),
                      changes / max(vad_mask.sum() * C.HOP_S, 1e-9))
        both = vad_mask & (res["allphone"][0] > 0) & (res["words"][0] > 0)
        agree = float(np.mean(res["allphone"][0][both] == res["words"][0][both])) if both.any() else float("nan")
        rows.append((f.name, len(audio) / C.SR, float(vad_mask.sum() * C.HOP_S), *res["allphone"][1:], *res["words"][1:], agree))
    return rows


def streamed(lat: torch.Tensor, chunk: int, vocoder) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The joint audio latent [F, tokens, C] streamed `chunk` latent frames at a time: (per-chunk
    Griffin-Lim as `--audio-out generated` played it before the vocoder, the streaming vocoder, chunk edges in samples)."""
    from models.audio import chunk_waveform, latent_to_logmel
    from models.config import AudioConfig
    from models.vocoder import VocoderStream

    cfg = AudioConfig()
    gl, voc, edges, n = [], [], [], 0
    stream = VocoderStream(vocoder)
    for i in range(0, lat.shape[0], chunk):
        piece = lat[i:i + chunk]
        gl.append(chunk_waveform(piece, i == 0, cfg).numpy())
        voc.append(stream.push(latent_to_logmel(piece, cfg, i == 0)).numpy())
        n += len(gl[-1])
        edges.append(n)
    voc.append(stream.flush().numpy())
    return np.concatenate(gl), np.concatenate(voc), edges[:-1]


def vocoder_section(vocoder_path: str | None, n: int) -> None:
    """Held-out TTS (eval voices and texts; the character voices on eval texts): log-mel distance of
    the resynthesis, allphone agreement with the espeak truth (the front end as a listener), and the
    flux ratio at chunk edges (3 latent frames = 0.48 s per chunk), the original audio at the same
    edges as the reference."""
    from models.audio import audio_latent, latent_frames_for, to_waveform
    from models.vocoder import load
    from stages.eval.metrics.audio import edge_flux_ratio, logmel_l1

    v = load(vocoder_path)
    rng = np.random.default_rng(11)
    groups = {"eval voices": [x for x in S.voices("eval")], "character voices": [V.VOICES[k][0] for k in sorted(V.VOICES)]}
    texts = S.texts("eval")
    print("| voices | audio | log-mel L1 | allphone agreement (phone / viseme / speech) | edge flux ratio |")
    print("|---|---|---|---|---|")
    for name, pool in groups.items():
        rows = {k: [] for k in ("original", "Griffin-Lim, whole clip (32 it)", "Griffin-Lim per chunk (16 it, today)",
                                "vocoder, whole clip", "vocoder, streamed")}
        for i in range(n):
            u = S.tts(texts[i % len(texts)], pool[rng.integers(len(pool))], int(rng.integers(120, 231)),
                      int(rng.integers(20, 81)), int(rng.integers(20, 91)))
            audio = (u.audio * 0.1 / (np.sqrt(np.mean(u.audio ** 2)) + 1e-9)).astype(np.float32)   # -20 dBFS RMS
            wave = torch.as_tensor(audio)
            F = latent_frames_for(len(audio))
            lat = audio_latent(wave, F, 4)
            gl_chunks, voc_stream, edges = streamed(lat, 3, v)
            N = min(len(audio), len(gl_chunks), len(voc_stream))
            log_mel = V.log_mel(audio)
            T = C.steps_for(N)
            truth = C.phone_steps(C.from_espeak(u.phonemes), T)
            waves = {"original": audio, "Griffin-Lim, whole clip (32 it)": to_waveform(lat).numpy(),
                     "Griffin-Lim per chunk (16 it, today)": gl_chunks, "vocoder, whole clip": v.synthesize(torch.as_tensor(log_mel)).numpy(),
                     "vocoder, streamed": voc_stream}
            for k, w in waves.items():
                w = w[:N]
                rows[k].append((logmel_l1(w, log_mel), *agreement(truth, C.phone_steps(C.recognise(w, "allphone"), T)),
                                edge_flux_ratio(w, [e for e in edges if e < N - 512])))
        for k, r in rows.items():
            m = np.mean(r, 0)
            print(f"| {name} | {k} | {m[0]:.3f} | {m[1]:.3f} / {m[2]:.3f} / {m[3]:.3f} | {m[4]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--texts", type=int, default=120)
    p.add_argument("--agree", type=int, default=48)
    p.add_argument("--media", default="../shared/media")
    p.add_argument("--vocoder", default=None, help="vocoder weights for the chunk-edge section (default: shipped)")
    p.add_argument("--vocoded", type=int, default=24, help="utterances per voice group in the vocoder section")
    p.add_argument("--only-vocoder", action="store_true")
    args = p.parse_args()
    print(f"## voice foundation (issue 19), {platform.node()} ({platform.processor() or 'cpu'})\n")

    if not args.only_vocoder:
        content_sections(args)
    print(f"\n### Vocoder (models/vocoder.py) vs Griffin-Lim on held-out TTS, {args.vocoded} utterances per group\n")
    vocoder_section(args.vocoder, args.vocoded)


def content_sections(args) -> None:
    voices = sorted(V.VOICES)
    texts = S.texts("train")[:args.texts]
    print(f"### Speaker probe: {len(voices)} voices x {len(texts)} texts, 4 folds by text, chance {1 / len(voices):.3f}\n")
    print("| corpus seed | " + " | ".join(["phones + loudness", "phones", "loudness", "log-mel (control)"]) + " |")
    print("|---|---|---|---|---|")
    for seed in (1, 2):
        corpus = V.probe_corpus(voices, texts, seed)
        r = probe_rows(corpus, voices, texts)
        print(f"| {seed} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |")
    y = np.array([voices.index(u.voice) for u in corpus])
    g = np.array([texts.index(u.text) for u in corpus])
    seqs = {"phones + loudness": [C.features(u.phone, u.loud) for u in corpus],
            "phones": [C.features(u.phone, 0 * u.loud) for u in corpus], "loudness": [u.loud[:, None] for u in corpus],
            "log-mel (control)": [V.log_mel(u.audio)[:, ::4] for u in corpus]}    # every 4th band: 320-wide windows
    print("| 2, window probe (160 ms windows, voting) | "
          + " | ".join(f"{V.probe_windows(x, y, g):.3f}" for x in seqs.values()) + " |")
    for u in corpus:                      # the same audio through the real front end instead of the espeak truth
        c = C.content(u.audio, "allphone")
        u.phone, u.loud = c["phone"], c["loud"]
    r = probe_rows(corpus, voices, texts)
    print("| 2, allphone front end | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |")

    print(f"\n### Front end vs the espeak truth: {args.agree} en-us utterances per split (phone / viseme / speech-silence step agreement)\n")
    print("| split | method | agreement | shifted +0.3 s (control) | CPU s per audio s |")
    print("|---|---|---|---|---|")
    for split in ("train", "eval"):
        r = front_end(args.agree, split)
        for m in ("allphone", "words"):
            fmt = " / ".join(f"{x:.3f}" for x in r[m])
            ctl = " / ".join(f"{x:.3f}" for x in r[m + " +0.3 s"])
            print(f"| {split} | {m} | {fmt} | {ctl} | {r['cpu_x_real_time ' + m]:.2f} |")

    media = Path(args.media)
    if media.is_dir():
        print("\n### Real speech (../shared/media): front end against silero-vad speech\n")
        print("| file | s | VAD speech s | allphone: speech called speech / silence called SIL / phones per s | "
              "words: same | allphone = words on shared speech steps |")
        print("|---|---|---|---|---|---|")
        for row in real_speech(media):
            name, dur, sp, a1, a2, a3, w1, w2, w3, ag = row
            print(f"| {name} | {dur:.1f} | {sp:.1f} | {a1:.2f} / {a2:.2f} / {a3:.1f} | {w1:.2f} / {w2:.2f} / {w3:.1f} | {ag:.2f} |")


if __name__ == "__main__":
    main()
