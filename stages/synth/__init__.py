"""A procedural avatar world with ground truth, for training the talking-avatar model and scoring it.

A sample is a character (random `Identity`, world.py) in a random `Scene` (backdrop, camera) who talks
(speech.py: audio that silero-vad detects, the mouth following it and closed in pauses) and performs
text instructions at known times ("blink", "nod", "turn left", ...), drawn by the one renderer
(render.py). `analyze` (analyze.py) measures the state back from pixels, so generated videos can be
scored against the ground truth. dataset.py makes samples and writes datasets:

    vidu synth --n 500 --out data/synth          # .mp4 (H.264 + AAC) and .json ground truth per sample
"""
from stages.synth.analyze import analyze, identity_error
from stages.synth.dataset import (
           Sample,
           Synth,
           make_sample,
           sample_seed,
           synthesize,
           write_dataset,
)
from stages.synth.render import REGIONS, region_masks, render, render_clip
from stages.synth.world import ACTIONS, TRACKS, Identity, Scene, State, frame_count

__all__ = ["ACTIONS", "REGIONS", "TRACKS", "Identity", "Sample", "Scene", "State", "Synth", "analyze", "frame_count",
           "identity_error", "make_sample", "region_masks", "render", "render_clip", "sample_seed", "synthesize", "write_dataset"]
