"""Pinned pyarrow schemas, one per manifest kind.

Every row of every manifest starts with the common columns; a stage's measured columns follow.
Later stages add their kinds to SCHEMAS. Times are seconds (float64) unless the name says frames.
"""
from __future__ import annotations

import pyarrow as pa

STATUSES = ("ok", "rejected", "error")

COMMON = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("parent_id", pa.string()),
    pa.field("status", pa.string(), nullable=False),  # ok | rejected | error
    pa.field("reasons", pa.list_(pa.string()), nullable=False),  # short codes, e.g. "low_fps"
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("error", pa.string()),  # one-line message for status=error (and unreadable inputs)
]

SEGMENT = pa.struct([("start", pa.float64()), ("end", pa.float64())])

VIDEOS = pa.schema(COMMON + [
    pa.field("path", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("content_hash", pa.string()),  # blake2b-128 of the file bytes
    pa.field("container", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("video_codec", pa.string()),
    pa.field("width", pa.int32()),  # as displayed (after rotation)
    pa.field("height", pa.int32()),
    pa.field("rotation", pa.int32()),  # degrees, from the display matrix
    pa.field("avg_fps", pa.float64()),  # frames / duration as the container declares it
    pa.field("real_fps", pa.float64()),  # r_frame_rate: the lowest rate that represents all timestamps
    pa.field("vfr", pa.bool_()),  # frame intervals vary (measured on demuxed timestamps)
    pa.field("frame_count", pa.int64()),  # demuxed video packets
    pa.field("video_duration_s", pa.float64()),
    pa.field("video_start_s", pa.float64()),
    pa.field("audio_codec", pa.string()),
    pa.field("sample_rate", pa.int32()),
    pa.field("channels", pa.int32()),
    pa.field("audio_duration_s", pa.float64()),
    pa.field("audio_start_s", pa.float64()),
    pa.field("av_mismatch_s", pa.float64()),  # |video duration - audio duration|
    pa.field("decode_probes", pa.int32()),  # positions tried
    pa.field("decode_failures", pa.int32()),
    pa.field("phash", pa.list_(pa.uint64())),  # 64-bit DCT hash per sampled frame
    pa.field("duplicate_of", pa.string()),  # id of the kept representative
])

CLIPS = pa.schema(COMMON + [
    pa.field("video_path", pa.string(), nullable=False),
    pa.field("clip_index", pa.int32(), nullable=False),  # order within the source video
    pa.field("shot_index", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("start_frame", pa.int64(), nullable=False),  # inclusive
    pa.field("end_frame", pa.int64(), nullable=False),  # exclusive
    pa.field("fps", pa.float64(), nullable=False),
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("speech_s", pa.float64()),
    pa.field("speech_coverage", pa.float64()),  # speech seconds / clip seconds
    pa.field("speech_segments", pa.list_(SEGMENT)),  # source-video seconds, clipped to the clip
    pa.field("cut_reasons", pa.list_(pa.string())),  # [why it starts, why it ends]
    pa.field("clip_path", pa.string()),  # set by --materialize
    pa.field("cut_method", pa.string()),  # copy | reencode (with --materialize)
])

SYNTH = pa.schema(COMMON + [  # procedural avatar samples (stages/synth/)
    pa.field("path", pa.string(), nullable=False),  # .mp4, H.264 + AAC
    pa.field("seed", pa.int64()),  # make_sample(seed) reproduces the sample
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("fps", pa.float64()),
    pa.field("frames", pa.int64()),  # T = 1 + 4k
    pa.field("duration_s", pa.float64()),  # T / fps, also the audio length
    pa.field("identity", pa.string()),  # JSON of stages.synth.Identity
    pa.field("actions", pa.string()),  # JSON [[start_s, end_s, instruction], ...]
    pa.field("speech_segments", pa.list_(SEGMENT)),  # utterance intervals
    pa.field("gt_path", pa.string()),  # .json ground truth: per-frame tracks and instructions, scene
])

# --- curation, second half. Each stage passes its input row through and adds its columns, so a
# manifest carries everything measured upstream: filtered = clips + FILTER_COLUMNS, diarized =
# filtered + DIARIZE_COLUMNS, captioned = diarized + CAPTION_COLUMNS. A stage also accepts any
# earlier kind of the chain (the missing columns stay null). Times are source-video seconds.

# --- filter (stages/filter.py owns this block)
FILTER_COLUMNS: list[pa.Field] = [
    pa.field("subject_count", pa.int32()),  # distinct tracked faces (subjects) over the sampled frames
    pa.field("face_frame_ratio", pa.float64()),  # sampled frames with the main subject's face
    pa.field("face_area_ratio", pa.float64()),  # median face box area / frame area (main subject)
    pa.field("face_box", pa.list_(pa.float64())),  # main subject's median [x0, y0, x1, y1] / (W, H, W, H)
    pa.field("camera_motion", pa.float64()),  # global motion, fraction of the frame width per second
    pa.field("subject_motion", pa.float64()),  # motion energy inside the subject region
    pa.field("subject_detector", pa.string()),  # dlib-hog-frontal | dlib-mmod:<path> | dlib-hog:<path> | transformers:<path>
    pa.field("face_tracks", pa.int32()),  # all face tracks, including ones too brief to count as subjects
    pa.field("frames_sampled", pa.int32()),  # frames on the sampling grid (sample_fps, max_side)
    pa.field("sharpness", pa.float64()),  # median variance of the luma Laplacian at the analysis size
    pa.field("luma_mean", pa.float64()),  # mean Rec.601 luma in [0, 1] (active area, bars excluded)
    pa.field("clipped_ratio", pa.float64()),  # pixels below 2 % or above 98 % luma
    pa.field("blockiness", pa.float64()),  # luma step across 8x8 block edges / inside blocks (native size)
    pa.field("flicker", pa.float64()),  # median |2nd difference| of frame mean luma / mean luma
    pa.field("jitter", pa.float64()),  # RMS high-pass of the phase-correlation motion path, frame widths
    pa.field("static_overlay_ratio", pa.float64()),  # area of cells dense in edges fixed over the clip
    pa.field("text_score", pa.float64()),  # area of fixed text-like stroke runs (burned-in text)
    pa.field("safety_status", pa.string()),  # assessed | not_assessed
    pa.field("safety_score", pa.float64()),  # max probability of an unsafe label (--safety-model)
    pa.field("safety_label", pa.string()),  # the unsafe label of that probability
    pa.field("omni_status", pa.string()),  # assessed | not_assessed | unparsable (--omni-model)
    pa.field("omni_editing", pa.string()),
    pa.field("omni_subject", pa.string()),
    pa.field("omni_action", pa.string()),
    pa.field("omni_emotion", pa.string()),
    pa.field("omni_face", pa.string()),
    pa.field("omni_speech", pa.string()),
    pa.field("omni_scene", pa.string()),
    pa.field("omni_shot", pa.string()),
    pa.field("omni_tone", pa.string()),
]

# --- diarize (stages/diarize.py owns this block)
SPEECH_SEGMENT = pa.struct([
    ("start", pa.float64()), ("end", pa.float64()),
    ("speaker", pa.string()),  # clip-local label, e.g. "S0"
    ("category", pa.string()),  # onscreen | offscreen | overlap
    ("energy_ratio", pa.float64()),  # speech-band energy / total energy
    ("confidence", pa.float64()),  # of the category (active-speaker correlation or overlap evidence)
    ("kept", pa.bool_()),  # false: discarded (overlap, low energy ratio)
])
DIARIZE_COLUMNS: list[pa.Field] = [
    pa.field("diarize_method", pa.string()),  # e.g. "silero-vad+resemblyzer" or "pyannote:<path>"
    pa.field("speakers", pa.int32()),
    pa.field("onscreen_s", pa.float64()),
    pa.field("offscreen_s", pa.float64()),
    pa.field("overlap_s", pa.float64()),
    pa.field("clean_speech_s", pa.float64()),  # kept speech (not overlap, energy ratio high enough)
    pa.field("speech_turns", pa.list_(SPEECH_SEGMENT)),
    pa.field("av_offset_frames", pa.int32()),  # A/V offset at 25 fps by vidu eval's sync proxy, + = audio late; null: not measurable
    pa.field("av_sync_confidence", pa.float64()),  # that sync curve's peak over its median
    pa.field("av_shift_s", pa.float64()),  # --fix-av-offset: audio lag to undo (sound of frame t at t + this); else null
]

# --- caption (stages/caption.py owns this block)
CHUNK_CAPTION = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("speaker", pa.string()),
                           ("category", pa.string()),  # onscreen | offscreen (turns) | speech (VAD) | silence
                           ("text", pa.string()),
                           ("transcript", pa.string()),  # what the --asr model heard in this chunk
                           ("loudness_lufs", pa.float64())])  # BS.1770 gated, 16 kHz mono; null under 0.4 s
CAPTION_COLUMNS: list[pa.Field] = [
    pa.field("caption", pa.string()),  # the rendered clip-level caption
    pa.field("caption_source", pa.string()),  # "measured" (no models) or "measured + vlm:... + asr:..."
    pa.field("chunk_captions", pa.list_(CHUNK_CAPTION)),  # aligned to the diarized speech turns
    pa.field("chunk_source", pa.string()),  # speech_turns (diarized) | speech_segments (silero-vad fallback)
    # visual fields (frames only; appearance/action/emotion/scene/on-screen text need --vlm, else null)
    pa.field("cap_subject", pa.string()),
    pa.field("cap_people", pa.string()),  # measured: subject count, face size and position (filter columns)
    pa.field("cap_action", pa.string()),
    pa.field("cap_motion", pa.string()),
    pa.field("cap_emotion", pa.string()),
    pa.field("cap_scene", pa.string()),
    pa.field("cap_camera", pa.string()),
    pa.field("cap_lighting", pa.string()),
    pa.field("cap_onscreen_text", pa.string()),
    # acoustic fields (audio only)
    pa.field("cap_dialogue", pa.string()),
    pa.field("cap_sound", pa.string()),
    pa.field("cap_music", pa.string()),
    pa.field("transcript", pa.string()),  # --asr: the chunks' transcripts joined; null without it
    pa.field("vlm_answer", pa.string()),  # --vlm: the model's raw answer
    pa.field("loudness_lufs", pa.float64()),  # ITU-R BS.1770-4 integrated (gated), on the 16 kHz mono mix
    pa.field("noise_floor_dbfs", pa.float64()),  # 10th percentile of 32 ms RMS levels
    pa.field("snr_db", pa.float64()),  # median speech-frame level minus the noise floor
    pa.field("speech_rate", pa.float64()),  # per second of speech, unit below
    pa.field("speech_rate_unit", pa.string()),  # syllables/s (envelope peaks) | words/s (transcript)
    pa.field("music_score", pa.float64()),  # share of non-speech time loud and tonal; null: < 0.5 s without speech
    pa.field("brightness", pa.float64()),  # mean Rec.601 luma in [0, 1] of the sampled frames
    pa.field("contrast", pa.float64()),  # RMS contrast: std of luma in [0, 1], mean over frames
    pa.field("colorfulness", pa.float64()),  # Hasler & Suesstrunk 2003 M on 0-255 RGB
]

# --- embed (stages/embed.py owns this block): one row per training window (id <clip id>_sNNN,
# parent_id = clip id); tensors live in the clip's safetensors shards under keys "<key_prefix>/<name>"
SAMPLES = pa.schema(COMMON + [
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("video_path", pa.string()),
    pa.field("sample_index", pa.int32()),  # window number within the clip
    pa.field("start_s", pa.float64()),  # window in source-video seconds: [start_s, start_s + frames / fps)
    pa.field("end_s", pa.float64()),
    pa.field("ref_s", pa.float64()),  # source-video second of the reference frame (stages/embed.py reference_time)
    pa.field("preset", pa.string()),  # models.config preset the geometry came from
    pa.field("frames", pa.int32()),  # T = 1 + 4k video frames
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("fps", pa.float64()),  # model frame rate the window is resampled to
    pa.field("source_fps", pa.float64()),  # the clip's own rate (measured frame times)
    pa.field("repeated_frames", pa.int32()),  # grid times that re-used the previous source frame
    pa.field("crop_box", pa.list_(pa.float64())),  # [x0, y0, x1, y1] source pixels cut before the resize
    pa.field("crop_center", pa.string()),  # face (the row's face_box) | frame
    pa.field("speech_coverage", pa.float64()),  # clip speech_segments seconds inside the window / window
    pa.field("latent_kind", pa.string()),  # frames | wan_vae | taehv
    pa.field("latent_shape", pa.list_(pa.int32())),  # of "<prefix>/video": [T, H, W, 3] uint8 or [C, F, h, w]
    pa.field("audio_shape", pa.list_(pa.int32())),  # of "<prefix>/audio": [F, mel_per_latent, n_mels] log-mel
    pa.field("wave_samples", pa.int64()),  # of "<prefix>/wave": 16 kHz mono float32
    pa.field("text_encoder", pa.string()),  # minilm | umt5:<path>
    pa.field("text_shape", pa.list_(pa.int32())),  # of the shard's "text" (the clip's text): [L, D] token features
    pa.field("text", pa.string()),  # the text that was encoded
    pa.field("text_source", pa.string()),  # caption | neutral (no caption on the row) | instruction (synth: most frames')
    pa.field("caption_source", pa.string()),  # copied from the captioned row
    pa.field("shard", pa.string()),  # safetensors file holding this sample's tensors
    pa.field("key_prefix", pa.string()),
    # per-chunk text with onsets (stages/samples.py text_timeline): the texts in force per latent frame
    pa.field("texts", pa.list_(pa.string())),  # [N] distinct texts of the window, rows of "<prefix>/texts"
    pa.field("texts_shape", pa.list_(pa.int32())),  # of "<prefix>/texts": [N, L, D], zero-padded to the longest
    pa.field("texts_source", pa.string()),  # chunk_captions | events | actions (vidu synth) | null: text on every frame
    pa.field("text_index", pa.list_(pa.int32())),  # [F] the text of each latent frame (into texts)
    pa.field("text_onsets", pa.list_(pa.float64())),  # [E] s from start_s at which a frame's text took force (first <= 0)
    pa.field("text_onset_index", pa.list_(pa.int32())),  # [E] the text that took force at each onset
])

# --- eval benchmarks (stages/eval/bench/ owns this block). bench_samples: one row per benchmark
# sample (synth | streambench | hdtf): a reference image, speech, timed instructions and, where the
# benchmark has one, a ground-truth video (and the synth ground truth). eval: one row per sample
# scored for one system (a checkpoint, the random-weight preset, or "oracle" = the ground truth).
BENCH_SAMPLES = pa.schema(COMMON + [
    pa.field("bench", pa.string(), nullable=False),  # synth | streambench | hdtf
    pa.field("image", pa.string()),  # reference first frame (png/jpg)
    pa.field("audio", pa.string()),  # speech (wav), 16 kHz mono once indexed
    pa.field("instruction", pa.string()),  # the sample's action instruction ("" = none)
    pa.field("events", pa.string()),  # JSON [[start_s, end_s, text], ...] timed instructions
    pa.field("video", pa.string()),  # ground-truth video (synth render, hdtf clip), or null
    pa.field("truth", pa.string()),  # .json ground truth of a synth case (tracks, identity), or null
    pa.field("seed", pa.int64()),  # synth: stages.synth.make_sample(seed) reproduces the case
    pa.field("control_seed", pa.int64()),  # synth: case whose speech is the mismatched-audio control
    pa.field("seconds", pa.float64()),  # audio length
    pa.field("source", pa.string()),  # where the sample came from (user folder line, hdtf file, builtin)
])
EVAL = pa.schema(COMMON + [
    pa.field("bench", pa.string(), nullable=False),
    pa.field("system", pa.string(), nullable=False),  # oracle | random:<preset> | checkpoint path
    pa.field("sample_id", pa.string(), nullable=False),  # id of the bench_samples row (parent_id too)
    pa.field("video_path", pa.string()),  # the system's video of this sample (small mp4, for --ab)
    pa.field("frames", pa.int32()),
    pa.field("seconds", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("scores", pa.string()),  # JSON: everything stages.eval.video.score_frames returned
    pa.field("identity", pa.float64()),  # mean cosine similarity, reference vs frames (identity_embedder)
    pa.field("identity_embedder", pa.string()),
    pa.field("sync_method", pa.string()),  # syncnet | the proxy's name
    pa.field("sync_offset_frames", pa.float64()),
    pa.field("sync_confidence", pa.float64()),
    pa.field("sync_distance", pa.float64()),
    pa.field("sharpness", pa.float64()),
    pa.field("flicker", pa.float64()),
    pa.field("face_found", pa.float64()),  # share of frames
    pa.field("drift_identity", pa.float64()),  # relative change, last drift segment vs first (score_frames)
    pa.field("drift_sharpness", pa.float64()),
    pa.field("drift_motion", pa.float64()),
    pa.field("curves", pa.string()),  # JSON {metric: [value per segment]} (drift curves)
    # synth ground truth (synth cases and the built-in streambench samples)
    pa.field("mouth_r", pa.float64()),  # Pearson r at zero lag, measured mouth vs the driving audio's mouth track
    pa.field("mouth_r_control", pa.float64()),  # the same against a mismatched case's mouth track
    pa.field("instr_events", pa.int32()),
    pa.field("instr_success", pa.float64()),  # share of events: own detector fires 0-1 s after onset, no other
    pa.field("instr_latency_s", pa.list_(pa.float64())),  # onset -> first firing, per successful event
    pa.field("spurious_per_min", pa.float64()),  # detections that answer no event (another class's too), per minute
    pa.field("spurious_idle_per_min", pa.float64()),  # ... of them, those outside every event's window (unprompted)
    pa.field("confusion", pa.string()),  # JSON {instructed: {detected or "none": count}}
    pa.field("instr_hit", pa.float64()),  # share of events: own detector fires 0-1 s after onset, others allowed
    pa.field("instr_hit_chance", pa.float64()),  # the same by chance: that class in a 1-s window at a random time
    pa.field("instr_classes", pa.string()),  # JSON {instructed: {"told": n, "success": strict n, "hit": n}}
    pa.field("instr_blockers", pa.string()),  # JSON {instructed: {other class fired in its 0-1 s window: events}}
    pa.field("style", pa.string()),  # the synth character's kind: human | anime | animal
    pa.field("action_sharpness_ratio", pa.float64()),  # mean sharpness inside events / outside every event + 1 s
    pa.field("action_identity_error", pa.float64()),  # identity_error over the frames inside events
    pa.field("identity_error", pa.float64()),  # mean RGB distance of skin/shirt/hair to the case's identity
    pa.field("drift_ratios", pa.string()),  # JSON: last 10 % vs first 10 % (identity, sharpness, motion, sync)
    # speed (the stream summary; null for the oracle)
    pa.field("stream_fps", pa.float64()),
    pa.field("first_frame_s", pa.float64()),
    pa.field("chunk_ms_p50", pa.float64()),
    pa.field("chunk_ms_p90", pa.float64()),
    pa.field("chunk_ms_p99", pa.float64()),
    pa.field("chunk_ms", pa.list_(pa.float64())),  # every chunk's generate + decode time
    pa.field("notes", pa.list_(pa.string())),  # random weights, missing models, not_assessed metrics
])

FILTERED = pa.schema(list(CLIPS) + FILTER_COLUMNS)
DIARIZED = pa.schema(list(FILTERED) + DIARIZE_COLUMNS)
SEGMENTS = pa.schema(COMMON + [  # one row per speech turn of `vidu diarize` (parent_id = clip id)
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("video_path", pa.string()),
] + [pa.field(f.name, f.type) for f in SPEECH_SEGMENT])
CAPTIONED = pa.schema(list(DIARIZED) + CAPTION_COLUMNS)
CHAIN = ("clips", "filtered", "diarized", "captioned")  # the kinds a curation stage may read, in order

SCHEMAS: dict[str, pa.Schema] = {"videos": VIDEOS, "clips": CLIPS, "synth": SYNTH, "filtered": FILTERED,
                                 "diarized": DIARIZED, "segments": SEGMENTS, "captioned": CAPTIONED,
                                 "samples": SAMPLES}

SCHEMAS.update({"bench_samples": BENCH_SAMPLES, "eval": EVAL})

def empty_row(schema: pa.Schema) -> dict:
    row = {f.name: None for f in schema}
    row["reasons"] = []
    return row
