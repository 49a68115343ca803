"""A procedural avatar world with ground truth, for training the talking-avatar model and scoring it.

A sample is a character (random `Identity` of a style, human, anime or animal, world.py) in a random
`Scene` (backdrop, a head-and-shoulders camera) who talks (speech.py: TTS or real speech; mouth opening
and lip rounding from its visemes or its loudness, closed in pauses) and is given text instructions
at known onsets ("blink", "nod", "turn left", ...; the action starts INSTRUCTION_DELAY later), drawn
by the one renderer (render.py, which also gives region masks of face, eyes, mouth and hands).
`analyze` (analyze.py) measures the state back from pixels, so generated videos can be scored
against the ground truth. dataset.py makes samples and writes datasets; media.py writes test media:

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
from stages.synth.world import (
    ACTIONS,
    INSTRUCTION_DELAY,
    STYLES,
    TRACKS,
    Event,
    Identity,
    Scene,
    State,
    frame_count,
)

__all__ = ["ACTIONS", "INSTRUCTION_DELAY", "REGIONS", "STYLES", "TRACKS", "Event", "Identity", "Sample", "Scene", "State", "Synth", "analyze", "frame_count",
           "identity_error", "make_sample", "region_masks", "render", "render_clip", "sample_seed", "synthesize", "write_dataset"]
