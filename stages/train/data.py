"""Training samples: clips turned into model inputs.

Clips come from a `ClipSource`: the synthetic world rendered on the fly (clip i = seed
`seed * 1_000_003 + i`), or the ok rows of a manifest: `vidu synth` output (the mp4 files and their
ground-truth sidecars) or `vidu embed` output (samples: frames or video latents, audio and text
features read from safetensors shards; stages/embed.py). Sample `i` is a pure function of (source, i): the codec encodes frames to latents, log-mel gives the speech
features and the joint audio latent, MiniLM encodes the instruction. Batches follow a per-epoch
permutation of the samples seeded by (seed, epoch), so global sample number g always maps to the
same sample: data position = step * batch, nothing to store for an exact resume.

A clip is as long as the data config's `latent_frames`: the model's for stage 1, the objective's
`clip_frames` for stage 2 (loop.py; long clips, so the stream's window wraps and timed instructions
land mid-clip). World clips rendered with `masks` also carry the mouth and eyes regions at latent
resolution ("mouth", "eyes" [F, h, w], `latent_regions`) for the loss weights; masks cost 35-70 % more
render time.

The codec is a TAEHV autoencoder trained on the world (stages/train/autoencoder.py), since no
pretrained video autoencoder can be downloaded here: the run's --codec, else the one its --from
checkpoint was trained with, else one trained first in out/codec-run/ (loop.py `prepare_codec`); the run keeps
a copy as out/codec.safetensors. Samples embedded with the Wan VAE or TAEHV carry their latents and
need no codec.
"""
from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.audio import audio_features, audio_latent, check_wave_speech
from models.config import NEUTRAL_TEXT, ModelConfig
from models.taehv import TAEHV, frames_to_latents
from stages.samples import TIME_EPS, reference_time, synth_events, synth_timeline, text_timeline
from stages.train.losses import REGIONS

CODEC_FILE = "codec.safetensors"      # in the run folder; checkpoints in out/step-N/ name it "../codec.safetensors"
STACK_BUDGET = 8 * 2 ** 30            # bytes: the most a run's coded clips may take when stacked on its device


def clip_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


REF_POSE_DRAW = 0x5EF   # the random stream of a clip's reference pose, apart from the world's own draws
FILL_DRAW = 1 << 40      # the random stream of the draws an overlapped prefetch makes (apart from the epochs' permutations)


def reference_state(seed: int, ref_pose: float):
    """The State a world clip's reference is rendered in: neutral (the pose a user's photo has), or, for a
    `ref_pose` share of the seeds, a random head pose and expression (yaw, pitch, mouth, smile; now and then
    half-closed eyes or a raised hand). A neutral reference beside clips that are neutral most of the time
    teaches the model to copy the reference's geometry: session 62's bidirectional teacher predicts turned
    or pitched frames about 5x worse than still ones, and better than still ones once its reference is
    itself turned (benchmarks/ref_pose_probe.py, RESULTS.md). A reference in another pose leaves identity as
    the only thing worth taking from it. Deterministic per seed, without touching the clip's own draws."""
    from stages import synth
    rng = np.random.default_rng([seed, REF_POSE_DRAW])
    if rng.random() >= ref_pose:
        return synth.State()
    yaw, pitch, mouth, smile, eyes, hand = rng.uniform([-1, -1, 0, 0, 0.3, 0], 1)
    return synth.State(mouth=mouth, yaw=yaw, pitch=pitch, smile=smile, eyes=eyes if rng.random() < 0.2 else 1.0,
                       hand=hand if rng.random() < 0.2 else 0.0)


def render_clip(seed: int, cfg: ModelConfig, masks: bool = False, split: str = "train", truth: bool = False,
                events: list | None = None, ref_pose: float = 0.0, voice: str | None = None) -> dict:
    """One synthetic clip: frames [T, H, W, 3] uint8 (T = cfg.video_frames), speech [T / fps s] at
    16 kHz, a reference frame of the same identity [H, W, 3] (neutral, or posed: `ref_pose`), its texts per latent frame (an
    instruction whose action the clip's end cuts included: short clips see instructions act) and,
    with `masks`, the mouth and eyes regions per latent frame ("mouth", "eyes" [F, H / 8, W / 8], `latent_regions`) and
    the sync loss's mouth crop corners ("mouth_box" [F, 2], stages/train/lipsync.py `mouth_boxes`);
    `split`: whose voices and texts (stages.synth); `truth`: also the ground truth (Sample.truth());
    `events` (stages.synth Events): these instructions instead of the seed's; `ref_pose`: the share of seeds
    whose reference shows the identity in a random pose (`reference_state`).
    A model that reads speech content (cfg.audio_encoder "content", issue 19) gets a clip said in a character
    voice (`voice`, a stages.synth.voice.VOICES name; default `voice_for(seed)`), not augmented: its speech
    features are the content of the TTS truth (`content_rows`), its joint audio target that voice, and
    "voice" its index."""
    from stages import synth
    said = None
    if cfg.audio_encoder == "content":
        from stages.synth.voice import VOICES, voice_for, voice_index
        voice = voice or voice_for(seed)
        said, index = VOICES[voice], voice_index(voice)
    s = synth.make_sample(seed, width=cfg.width, height=cfg.height, fps=cfg.audio.fps,
                          seconds=cfg.video_frames / cfg.audio.fps, masks=masks, split=split,
                          cut_actions=split == "train",   # held-out clips stay as the bench renders them
                          events=events, voice=said)
    if s.frames.shape[0] != cfg.video_frames:
        raise ValueError(f"synthetic clip has {s.frames.shape[0]} frames; the model takes {cfg.video_frames}")
    ref = synth.render(s.identity, reference_state(seed, ref_pose), cfg.width, cfg.height, s.scene)   # same scene
    c = {"frames": s.frames, "audio": s.audio, "ref": ref, "text": per_frame_texts(synth_timeline(s, NEUTRAL_TEXT))}
    if said is not None:
        c["audio_features"], c["voice"] = content_rows(s.audio, s.said.phones, cfg), index
    if masks:
        from stages.train.lipsync import LipSyncConfig, mouth_boxes
        for region in REGIONS:
            c[region] = latent_regions(s.masks[region], cfg.audio.video_frames_per_latent, 8)
        c["mouth_box"] = mouth_boxes(s.masks["mouth"], LipSyncConfig.for_model(cfg), cfg.audio.video_frames_per_latent)
    if truth:
        c["truth"] = s.truth()
    return c


def content_rows(audio: np.ndarray, phones: list, cfg: ModelConfig) -> torch.Tensor:
    """The speech features of a content model (cfg.audio_encoder "content"): the phones (ARPAbet segments
    on the clip's timeline) and the loudness of `audio`, on the latent timeline with the model's speech
    context, [before + F + after, mel_per_latent, CONTENT_DIM], as audio_features lays out log-mel (steps
    outside the clip are silence)."""
    from stages.sense import content as C
    before, after = cfg.dit.audio_context
    c = C.content(audio, segments=phones)
    return C.latent_rows(c["phone"], c["loud"], before + cfg.latent_frames + after, before)


def latent_regions(mask: np.ndarray, per: int, down: int) -> torch.Tensor:
    """A region's coverage [T, H, W] (T = 1 + per * (F - 1) video frames) -> [F, H / down, W / down]:
    the max over each latent frame's video frames (frame 0 alone, then per at a time, as the codec
    groups them) and over each down x down pixel block."""
    T = mask.shape[0]
    if (T - 1) % per:
        raise ValueError(f"{T} frames do not group into latent frames of {per}")
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()
    m = torch.cat([m[:1], m[1:].unflatten(0, (-1, per)).amax(1)])              # [F, H, W]
    return torch.nn.functional.max_pool2d(m[None], down)[0]


def per_frame_texts(timeline) -> tuple[list, list[int]]:
    """(distinct texts, the one in force at each latent frame): stages/samples.py's rule, a mid-clip
    instruction acts from the first latent frame shown after its onset, as in `vidu stream`."""
    return list(timeline.texts), list(timeline.index)


class ClipSource:
    """Clip i of a run: rendered from the synthetic world, or read from a manifest's ok rows."""

    def __init__(self, cfg: ModelConfig, seed: int, n: int, manifest: str | Path | None = None, masks: bool = False,
                 ref_pose: float = 0.0):
        if manifest and ref_pose:
            raise ValueError("--ref-pose renders the references of world clips; a manifest's clips bring their own")
        if manifest:
            check_wave_speech(cfg)
        self.cfg, self.seed, self.masks, self.ref_pose = cfg, seed, masks, ref_pose
        self.kind, self.rows = manifest_rows(manifest, cfg) if manifest else ("world", None)
        self.n = len(self.rows) if self.rows is not None else n

    def __call__(self, i: int) -> dict:
        if self.rows is None:
            return render_clip(clip_seed(self.seed, i), self.cfg, self.masks, ref_pose=self.ref_pose)
        if self.kind == "samples":
            return read_sample_clip(self.rows[i])
        return read_clip(self.rows[i], self.cfg)

    @property
    def needs_codec(self) -> bool:
        """Frames to code with the autoencoder (everything but samples that carry latents)."""
        return self.kind != "samples" or self.rows[0]["latent_kind"] == "frames"


def manifest_rows(path: str | Path, cfg: ModelConfig) -> tuple[str, list[dict]]:
    """(kind, ok rows) of a synth or samples manifest; samples must fit the model `cfg`."""
    from manifests.io import ok_rows, read_manifest
    table, meta = read_manifest(path)
    kind = meta.get("kind")
    if kind not in ("synth", "samples"):
        raise ValueError(f"{path} is a {kind} manifest; vidu train reads synth manifests (vidu synth) "
                         f"or samples manifests (vidu embed)")
    rows = ok_rows(table)
    if not rows:
        raise ValueError(f"{path} has no ok rows to train on")
    if kind == "samples":
        check_samples(rows, cfg, path)
    return kind, rows


def check_samples(rows: list[dict], cfg: ModelConfig, path: str | Path) -> None:
    """One latent kind, and the model's frame count, size, fps and text width, or a one-line error."""
    kinds = sorted({r["latent_kind"] for r in rows})
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes latent kinds {', '.join(kinds)}; train on one kind at a time")
    want = (cfg.video_frames, cfg.height, cfg.width, float(cfg.audio.fps), cfg.dit.text_dim)
    for r in rows:
        got = (r["frames"], r["height"], r["width"], r["fps"], r["text_shape"][-1])
        if got != want:
            raise ValueError(f"sample {r['id']} is {got[0]} frames of {got[2]}x{got[1]} at {got[3]:g} fps with "
                             f"{got[4]}-d text; preset {cfg.name} takes {want[0]} frames of {want[2]}x{want[1]} at "
                             f"{want[3]:g} fps with {want[4]}-d text (re-run vidu embed --preset {cfg.name})")


def read_sample_clip(row: dict) -> dict:
    """A `vidu embed` sample in the clip form encode_clip takes: frames (or latents), the waveform,
    the stored audio features, and the text features in place of the text."""
    from stages.samples import read_sample
    t = read_sample(row)
    text = (list(t["texts"]), t["text_index"].tolist()) if "text_index" in t else t["text"]   # per latent frame
    c = {"audio": t["wave"].numpy(), "audio_features": t["audio"], "text": text}
    if row["latent_kind"] == "frames":
        c["frames"] = t["video"].numpy()
        # the reference frame vidu embed picked away from the window; shards written before it: the first frame
        c["ref"] = t["ref_frame"].numpy() if "ref_frame" in t else c["frames"][0]
    else:
        c["latent"], c["ref_latent"] = t["video"], t["ref"]
    return c


def read_clip(row: dict, cfg: ModelConfig) -> dict:
    """A written clip: its first cfg.video_frames frames cover-scaled to the model size, their audio, the
    reference frame away from them (`reference_time`, as `vidu embed` picks it: the middle of the rest of
    the clip, or the window's last frame when the clip is one window), the instruction from the
    ground-truth sidecar (if any)."""
    import json
    from models.encoders import image_tensor
    from stages.sense.media import load_audio, open_container
    T, fps = cfg.video_frames, cfg.audio.fps

    def model_frame(f) -> np.ndarray:
        img = image_tensor(f.to_ndarray(format="rgb24"), cfg.height, cfg.width)[0, :, 0]
        return ((img + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    frames, ref = [], None
    with open_container(row["path"]) as c:
        stream = c.streams.video[0]
        total = stream.frames or round(float(c.duration or 0) / 1e6 * fps)     # av.time_base: microseconds
        shown = math.floor(reference_time(0.0, total / fps, 0.0, T, fps) * fps + TIME_EPS)   # the frame shown then
        k = min(max(T - 1, shown), max(T, total) - 1)
        for n, f in enumerate(c.decode(stream)):
            if n < T:
                frames.append(model_frame(f))
            if n == k:
                ref = frames[k] if k < T else model_frame(f)
                break
    if len(frames) < T:
        raise ValueError(f"{row['path']} has {len(frames)} frames; training clips need {T}")
    ref = frames[-1] if ref is None else ref              # fewer frames than the container said
    audio = load_audio(row["path"], cfg.audio.sample_rate)
    n = T * cfg.audio.sample_rate // fps
    audio = np.pad(audio[:n], (0, max(0, n - len(audio[:n]))))
    text = NEUTRAL_TEXT
    if row.get("gt_path") and Path(row["gt_path"]).is_file():
        events, _ = synth_events(json.loads(Path(row["gt_path"]).read_text()))
        text = per_frame_texts(text_timeline(NEUTRAL_TEXT, events, 0.0, cfg.latent_frames, fps,
                                             cfg.audio.video_frames_per_latent, base_onset=0.0))
    return {"frames": np.stack(frames), "audio": audio.astype(np.float32), "ref": ref, "text": text}


@torch.no_grad()
def encode_clip(cfg: ModelConfig, codec: TAEHV | None, c: dict) -> dict:
    """Model inputs of one clip (text still as a string or as [L, D] features, under "instruction").
    A clip that carries latents ("latent", "ref_latent") or audio features skips those encoders."""
    d, F = cfg.dit, cfg.latent_frames
    wave = torch.from_numpy(c["audio"])
    if "latent" in c:
        s = {"video": c["latent"], "ref": c["ref_latent"]}
    else:
        s = {"video": frames_to_latents(codec, c["frames"]), "ref": frames_to_latents(codec, c["ref"][None])}
    s["instruction"] = c["text"]
    if "voice" in c:
        s["voice"] = torch.tensor(c["voice"])
    for key in (*REGIONS, "mouth_box"):
        if key in c:
            s[key] = c[key]
    if d.audio_dim:
        s["audio"] = c["audio_features"] if "audio_features" in c else audio_features(wave, F, cfg.audio, context=d.audio_context)
    if d.joint_audio:
        s["audio_latent"] = audio_latent(wave, F, d.audio_latent_tokens, cfg.audio)
    return s


def fit_text(feats: torch.Tensor, length: int) -> torch.Tensor:
    """Text features [L', D] -> [length, D]: cut, or zero-padded (the DiT's text_len)."""
    return torch.cat([feats[:length], feats.new_zeros(max(0, length - feats.shape[0]), feats.shape[1])])


class WithAudioFeatures:
    """A ClipSource whose clips also carry their audio features, computed where the clip is rendered (a
    prefetch worker), not in the one process that codes every clip (session 31: on the GPU machine that
    process, not the 15 renderers, set the pace of stage 2's 1024 clips, ~0.2 s a clip)."""

    def __init__(self, source: ClipSource):
        self.source = source

    def __call__(self, i: int) -> dict:
        c, cfg = self.source(i), self.source.cfg
        if cfg.dit.audio_dim and "audio_features" not in c:
            c["audio_features"] = audio_features(torch.from_numpy(c["audio"]), cfg.latent_frames, cfg.audio,
                                                 context=cfg.dit.audio_context)
        return c


class Dataset:
    def __init__(self, source: ClipSource, seed: int, codec: TAEHV | None, encode_text, codec_record: dict | None = None):
        self.source, self.cfg, self.n, self.seed = source, source.cfg, source.n, seed
        self.codec, self.encode_text = codec, encode_text
        self.codec_record = codec_record          # what checkpoints record of the codec (sampling["codec"])
        self.cache: dict[int, dict] = {}
        self.text_cache: dict[str, torch.Tensor] = {}
        self.perms: dict[int, torch.Tensor] = {}
        self.stacked: dict[str, torch.Tensor] | None = None   # every clip's tensors stacked (stack_on)
        self.stack_device: torch.device | None = None           # stack there once every clip is coded (start)
        # (first, per): sample g is drawn from the first `first` + g // per clips (a run training while its
        # clips render, TrainSettings.render_overlap), then the epochs' permutations go on from there
        self.fill: tuple[int, int] | None = None
        self._ready = threading.Condition()           # a clip joined the cache (prefetch's thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _frame_texts(self, text) -> torch.Tensor:
        """A clip's text (a string or features [L, D]), or (distinct texts, index per latent frame) ->
        [F, text_len, D]: the model reads a text per frame, so mid-clip instructions are trained on.
        Each distinct text is encoded once; one text for the clip is a view of one copy."""
        F = self.cfg.latent_frames
        texts, index = text if isinstance(text, tuple) else ([text], [0] * F)
        if len(index) != F:
            raise ValueError(f"{len(index)} per-frame texts for {F} latent frames")
        table = [self._text(x) for x in texts]
        if len(set(index)) == 1:
            return table[index[0]].expand(F, -1, -1)
        return torch.stack(table)[torch.tensor(index)]

    def _text(self, text: str | torch.Tensor) -> torch.Tensor:
        """A text (encoded once, cached) or its features [L, D] -> [text_len, D], zero-padded."""
        if torch.is_tensor(text):
            return fit_text(text, self.cfg.dit.text_len)
        if text not in self.text_cache:
            self.text_cache[text] = fit_text(self.encode_text([text])[0], self.cfg.dit.text_len)
        return self.text_cache[text]

    def sample(self, i: int) -> dict:
        if i not in self.cache and self._thread is not None:
            self.wait(i)
        if i not in self.cache:
            s = encode_clip(self.cfg, self.codec, self.source(i))
            s["text"] = self._frame_texts(s.pop("instruction"))
            self.cache[i] = s
        return self.cache[i]

    def start(self, workers: int, overlap: int, first: int, device) -> None:
        """How a run gets its clips. `overlap` > 0 (TrainSettings.render_overlap): sample g is drawn from
        the first `first` clips and one more every `overlap` samples (`fill`), the same with workers or
        without; `workers` > 0: the clips render in that many processes, all before the first step, or
        beside training with `overlap`, and on CUDA the batches become one gather there once every clip is
        coded (`stack_on`)."""
        if overlap:
            self.fill = (min(self.n, first), overlap)
        if workers:
            device = torch.device(device)
            self.stack_device = device if device.type == "cuda" else None
            self.prefetch(workers, background=bool(overlap))

    def prefetch(self, workers: int, background: bool = False) -> None:
        """Render (or read) every clip and its audio features in `workers` processes of one thread each,
        in index order, and code them here with the autoencoder as they arrive, on its device (the GPU
        run would otherwise wait on the CPU clip by clip; the workers never touch the GPU). The same
        samples as `sample` codes one at a time.
        `background`: return once the clips the first draws need are coded (`fill`'s first) and render
        the rest in a thread while training runs (the GPU would otherwise idle through the rendering: a
        third of session 63's stage-1 phases); `sample` waits for a clip still coming. With `fill` set,
        the batches depend on g alone, never on how fast the workers are."""
        todo = [i for i in range(self.n) if i not in self.cache]
        if not background:
            self._render(todo, workers)
            return
        self._thread = threading.Thread(target=self._render, args=(todo, workers), name="prefetch", daemon=True)
        self._thread.start()
        self.wait((self.fill[0] if self.fill else 1) - 1)

    def _render(self, todo: list[int], workers: int) -> None:
        """prefetch's work: a bounded window of clips in flight, coded in order; stops early on close()."""
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing as mp
        try:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                     initargs=(1,)) as pool:
                render, ahead, left = WithAudioFeatures(self.source), deque(), iter(todo)
                for i in left:
                    ahead.append((i, pool.submit(render, i)))
                    if len(ahead) >= 4 * workers:
                        break
                while ahead and not self._stop.is_set():
                    i, job = ahead.popleft()
                    c = job.result()
                    nxt = next(left, None)
                    if nxt is not None:
                        ahead.append((nxt, pool.submit(render, nxt)))
                    s = encode_clip(self.cfg, self.codec, c)
                    s["text"] = self._frame_texts(s.pop("instruction"))
                    with self._ready:
                        self.cache[i] = s
                        self._ready.notify_all()
                for _, job in ahead:
                    job.cancel()
        except BaseException as e:          # told to whoever waits for a clip (the training loop)
            if self._thread is None:
                raise
            self._error = e
        finally:
            with self._ready:
                self._ready.notify_all()

    def wait(self, i: int) -> None:
        """Until prefetch's thread has coded clip i (returns at once when it is not coming: `sample` then
        codes it here)."""
        with self._ready:
            while i not in self.cache:
                if self._error is not None:
                    raise RuntimeError(f"rendering the training clips failed: {self._error}") from self._error
                if self._thread is None or not self._thread.is_alive():
                    return
                self._ready.wait(1.0)

    def rendered(self) -> bool:
        return len(self.cache) >= self.n

    def close(self) -> None:
        """Stop prefetch's thread (training ended before the rendering did)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def index(self, g: int) -> int:
        """Global sample number -> dataset index: per-epoch permutations, after `fill`'s seeded draws from
        the clips due by g."""
        if self.fill is not None:
            first, per = self.fill
            filling = (self.n - first) * per
            if g < filling:
                pick = torch.Generator().manual_seed(self.seed * 7919 + FILL_DRAW + g)
                return int(torch.randint(first + g // per, (1,), generator=pick))
            g -= filling
        epoch, pos = divmod(g, self.n)
        if epoch not in self.perms:
            self.perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))}
        return int(self.perms[epoch][pos])

    def stack_on(self, device, budget: int = STACK_BUDGET) -> bool:
        """Every clip (all rendered and coded: after `prefetch`) stacked into one tensor per key on
        `device`, so that a batch is one gather there instead of stacking and copying each step's
        samples on the host. False (and nothing kept) when they would take more than `budget` bytes."""
        if len(self.cache) < self.n:
            raise RuntimeError(f"stack_on needs every clip coded ({len(self.cache)} of {self.n}): prefetch first")
        first = self.cache[0]
        if self.n * sum(v.numel() * v.element_size() for v in first.values()) > budget:
            return False
        self.stacked = {k: torch.stack([self.cache[i][k] for i in range(self.n)]).to(device) for k in first}
        return True

    def batch(self, g0: int, count: int, device) -> dict:
        if self.stack_device is not None and self.rendered():
            to, self.stack_device = self.stack_device, None
            self.stack_on(to)
        if self.stacked is not None:
            idx = torch.tensor([self.index(g) for g in range(g0, g0 + count)])
            return {k: v[idx.to(v.device)].to(device) for k, v in self.stacked.items()}
        items = [self.sample(self.index(g)) for g in range(g0, g0 + count)]
        return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def codec_record(path: Path, codec: TAEHV) -> dict:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return {"kind": "taehv", "file": f"../{CODEC_FILE}", "channels": codec.config.latent_channels, "sha256": digest}


def teacher_codec(init_from: str | None) -> Path | None:
    """The codec file the checkpoint `init_from` was trained with (None: none recorded)."""
    from models.checkpoint import checkpoint_file, checkpoint_sampling
    rec = (checkpoint_sampling(init_from) or {}).get("codec") or {} if init_from else {}
    if rec.get("kind") == "pca":
        raise ValueError(f"{init_from} was trained on PCA-codec latents, which vidu no longer has; train its "
                         f"stage again with an autoencoder (--codec)")
    return checkpoint_file(init_from).parent / rec["file"] if rec.get("file") else None


def build_dataset(cfg: ModelConfig, st, out: Path, d, prepare_codec, masks: bool = False, ref_pose: float = 0.0) -> Dataset:
    """The run's dataset of clips of cfg.latent_frames (settings `st`: samples, seed, data, codec, init_from;
    `masks`: world clips carry the mouth region; `ref_pose`: ClipSource's); rank 0 prepares the codec
    in `out` (`prepare_codec(cfg, st, out)`, stages/train/loop.py), the others wait and load it. Text features come from the samples' shards, else MiniLM or
    the table file named by $VIDU_TEXT_TABLE."""
    from models.checkpoint import load_taehv
    from models.encoders import text_encoder
    source = ClipSource(cfg, st.seed, st.samples, st.data, masks, ref_pose)
    codec, record = None, None
    if source.needs_codec:
        path = Path(out) / CODEC_FILE
        if d.main:
            prepare_codec(cfg, st, out)
        if d.world > 1:
            dist.barrier()
        codec = load_taehv(path, d.device)            # clips are coded on the training device
        if codec.config.latent_channels != cfg.dit.in_dim:
            raise ValueError(f"the codec makes {codec.config.latent_channels}-channel latents; preset {cfg.name} "
                             f"takes {cfg.dit.in_dim}")
        record = codec_record(path, codec)
    if source.kind == "samples":                     # text features come with the samples
        return Dataset(source, st.seed, codec, None, record)
    if cfg.text_encoder != "minilm":
        raise ValueError(f"training on the synthetic world uses the MiniLM text encoder; preset {cfg.name} "
                         f"expects {cfg.text_encoder}")
    enc = text_encoder("minilm", max_len=cfg.dit.text_len)
    return Dataset(source, st.seed, codec, enc, record)
