"""`vidu train`: train the video autoencoder or a teacher stage on the synthetic avatar world or
embedded samples (stages/train/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.train.autoencoder import AutoencoderSettings
from stages.train.loop import TrainSettings
from stages.train.objectives import ObjectiveSettings
from vidu_cli.options import Quiet, Workdir, option
from vidu_cli.report import clean_errors, err


def train(
    stage: str = option(TrainSettings, "stage", "What to train: the video autoencoder, the bidirectional teacher (stage 1) or the causal one (stage 2).", default=...),
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, codec, loss.jsonl and loss.png (re-run to resume).")] = ...,
    from_: Optional[Path] = option(TrainSettings, "init_from", "Start from this checkpoint (stage 2: the bidirectional teacher).", "--from", show_default=False),
    codec: Optional[Path] = option(TrainSettings, "codec", "Teachers: the video autoencoder coding the frames (an autoencoder run's ema.safetensors); default: the --from checkpoint's, else a quick one trained first.", show_default=False),
    warm_from: Optional[Path] = option(TrainSettings, "warm_from", "Teachers: seed the model with this checkpoint of another preset (every tensor of the same name and shape; e.g. a small teacher for small-voice).", "--warm-from", show_default=False),
    recode: bool = option(TrainSettings, "recode", "Teachers: train --from's DiT on another --codec than the one it was trained with (it relearns the latents).", "--recode/--no-recode"),
    preset: str = option(TrainSettings, "preset", "Model preset (tiny and small are trained on the synthetic avatar world)."),
    steps: int = option(TrainSettings, "steps", "Optimisation steps in total."),
    minutes: Optional[float] = option(TrainSettings, "minutes", "Stop with a checkpoint after this much training time (re-run to continue).", show_default=False),
    batch: int = option(TrainSettings, "batch", "Global batch (split across torchrun processes)."),
    sequence_parallel: int = option(TrainSettings, "sequence_parallel", "Teachers under torchrun: groups of this many processes split each sample's tokens (Ulysses; the model's heads must split over them)."),
    lr: float = option(TrainSettings, "lr", "Peak learning rate (AdamW)."),
    warmup: int = option(TrainSettings, "warmup", "Linear warmup steps, then cosine decay."),
    weight_decay: float = option(TrainSettings, "weight_decay", "AdamW weight decay."),
    grad_clip: float = option(TrainSettings, "grad_clip", "Gradient norm clip."),
    ema: float = option(TrainSettings, "ema", "EMA decay of the kept weights."),
    grad_ckpt: bool = option(TrainSettings, "grad_ckpt", "Gradient checkpointing per block.", "--grad-ckpt/--no-grad-ckpt"),
    compile: bool = option(TrainSettings, "compile", "Compile each DiT block with torch.compile (CUDA only).", "--compile/--no-compile"),
    save_every: int = option(TrainSettings, "save_every", "Checkpoint every N steps."),
    samples: int = option(TrainSettings, "samples", "Synthetic training clips (cycled)."),
    data: Optional[Path] = option(TrainSettings, "data", "Train on this manifest instead of clips rendered on the fly: synth (vidu synth) or samples (vidu embed, embedded at the same --preset).", show_default=False),
    seed: int = option(TrainSettings, "seed", "Seed of data, noise and initialisation."),
    shift: float = option(ObjectiveSettings, "shift", "Noise-level shift of the flow-matching schedule."),
    p_teacher_forcing: float = option(ObjectiveSettings, "p_teacher_forcing", "Stage 2: probability of teacher forcing (else diffusion forcing)."),
    chunk_frames: Optional[int] = option(ObjectiveSettings, "chunk_frames", "Stage 2: latent frames per causal chunk (default: the preset's).", show_default=False),
    tau_dist: str = option(ObjectiveSettings, "tau_dist", "Stage 2: history noise distribution."),
    tau_max: float = option(ObjectiveSettings, "tau_max", "Stage 2: largest history noise level."),
    clip_frames: int = option(ObjectiveSettings, "clip_frames", "Stage 2: latent frames per training clip (longer than the stream's context, so the window wraps)."),
    loss_weight: str = option(ObjectiveSettings, "loss_weight", "Video loss weight by noise level: x0 | v."),
    mouth_weight: float = option(ObjectiveSettings, "mouth_weight", "Video loss weight of the mouth region (world clips)."),
    eyes_weight: float = option(ObjectiveSettings, "eyes_weight", "Video loss weight of the eyes region (world clips)."),
    sync_weight: float = option(ObjectiveSettings, "sync_weight", "Weight of the sync loss (needs --lipsync)."),
    lipsync: Optional[Path] = option(ObjectiveSettings, "lipsync", "A trained lip-sync discriminator (stages/train/lipsync.py) for the sync loss.", show_default=False),
    p_drop_text: float = option(ObjectiveSettings, "p_drop_text", "Condition dropout: probability a sample loses its text."),
    p_drop_audio: float = option(ObjectiveSettings, "p_drop_audio", "Condition dropout: probability a sample loses its speech."),
    p_drop_ref: float = option(ObjectiveSettings, "p_drop_ref", "Condition dropout: probability a sample loses its reference frame."),
    ref_pose: float = option(ObjectiveSettings, "ref_pose", "Share of world clips whose reference frame shows a random head pose and expression (against copying the reference's geometry)."),
    region_weight: float = option(AutoencoderSettings, "region_weight", "Autoencoder: loss weight of mouth, eye and hand pixels."),
    face_weight: float = option(AutoencoderSettings, "face_weight", "Autoencoder: loss weight of the rest of the face."),
    temporal_weight: float = option(AutoencoderSettings, "temporal_weight", "Autoencoder: weight of the frame-difference loss."),
    frames: Optional[int] = option(AutoencoderSettings, "frames", "Autoencoder: frames per training clip, 1 + 4k (default: the preset's clip).", show_default=False),
    motion_weight: float = option(AutoencoderSettings, "motion_weight", "Autoencoder: weight of the frame-difference loss inside mouth, eyes and hands alone."),
    mouth_grow: float = option(AutoencoderSettings, "mouth_grow", "Autoencoder: the mouth's weight also on its surroundings (snout, nose, chin), this x frame height."),
    mouth_contrast: float = option(AutoencoderSettings, "mouth_contrast", "Autoencoder: the mouth zone x clip(this / RGB distance of the mouth to its surroundings, 1, 4); 0: off."),
    reuse: int = option(AutoencoderSettings, "reuse", "Autoencoder: steps per rendered batch (as rendered, reversed, mirrored, both)."),
    init: Optional[Path] = option(AutoencoderSettings, "init", "Autoencoder: warm start from this autoencoder file (an ema.safetensors of the preset's widths).", show_default=False),
    freeze_encoder: bool = option(AutoencoderSettings, "freeze_encoder", "Autoencoder: train the decoder alone (the latents stay --init's).", "--freeze-encoder/--no-freeze-encoder"),
    animal_share: float = option(AutoencoderSettings, "animal_share", "Autoencoder: share of training clips drawn in the animal style."),
    cut_actions: bool = option(AutoencoderSettings, "cut_actions", "Autoencoder: training clips also show the action their end cuts.", "--cut-actions/--no-cut-actions"),
    nod_share: float = option(AutoencoderSettings, "nod_share", "Autoencoder: share of training clips whose instructions are one nod."),
    render_overlap: int = option(TrainSettings, "render_overlap", "Train while the clips render (with --workers): the draws start on the first batch's clips and each further clip joins after this many more samples (0: every clip rendered first)."),
    workers: Annotated[int, typer.Option(min=0, help="Processes rendering training data (teachers: the whole set up front, or beside training with --render-overlap).")] = 0,
    workdir: Workdir = None,
    quiet: Quiet = False,
) -> None:
    """Train the video autoencoder or a teacher stage on the synthetic avatar world; re-running the same
    command resumes.

    Example: vidu train --stage autoencoder --preset small --out runs/ae --steps 3000 --minutes 9 --workers 14
    Example: vidu train --stage autoencoder --preset small --init ae.safetensors --motion-weight 4 --reuse 2 --lr 2e-4 --animal-share 0.75 --mouth-contrast 150 --nod-share 0.3 --out runs/ae2 --minutes 6
    Example: vidu train --stage bidirectional --preset tiny --out runs/bi --steps 300 --codec runs/ae/step-003000/ema.safetensors
    Example: vidu train --stage causal --from runs/bi/step-000300/ema.safetensors --out runs/causal
    Example: vidu train --stage bidirectional --preset tiny --data $(vidu embed --from captioned.parquet) --out runs/real
    Example: torchrun --nproc-per-node 2 $(which vidu) train --stage bidirectional --out runs/bi2
    Example: torchrun --nproc-per-node 4 $(which vidu) train --stage causal --from bi.safetensors --sequence-parallel 2 --out runs/c4
    """
    from manifests.io import workspace
    from stages.train.loop import train as run_train
    with clean_errors():
        st = TrainSettings(stage=stage, preset=preset, steps=steps, batch=batch, sequence_parallel=sequence_parallel,
                           lr=lr, warmup=warmup,
                           weight_decay=weight_decay, grad_clip=grad_clip, ema=ema, grad_ckpt=grad_ckpt,
                           compile=compile,
                           save_every=save_every, seed=seed, samples=samples, data=str(data) if data else None,
                           init_from=str(from_) if from_ else None, warm_from=str(warm_from) if warm_from else None,
                           codec=str(codec) if codec else None,
                           recode=recode, minutes=minutes, render_overlap=render_overlap,
                           objective=ObjectiveSettings(shift=shift, p_teacher_forcing=p_teacher_forcing,
                                                       chunk_frames=chunk_frames, tau_dist=tau_dist, tau_max=tau_max,
                                                       clip_frames=clip_frames, loss_weight=loss_weight,
                                                       mouth_weight=mouth_weight, eyes_weight=eyes_weight,
                                                       sync_weight=sync_weight,
                                                       lipsync=str(lipsync) if lipsync else None, p_drop_text=p_drop_text,
                                                       p_drop_audio=p_drop_audio, p_drop_ref=p_drop_ref,
                                                       ref_pose=ref_pose),
                           autoencoder=AutoencoderSettings(region_weight=region_weight, face_weight=face_weight,
                                                           temporal_weight=temporal_weight, frames=frames,
                                                           motion_weight=motion_weight, mouth_grow=mouth_grow,
                                                           mouth_contrast=mouth_contrast, reuse=reuse,
                                                           init=str(init) if init else None,
                                                           freeze_encoder=freeze_encoder, animal_share=animal_share,
                                                           cut_actions=cut_actions, nod_share=nod_share))
        with _Progress(quiet, steps) as progress:
            summary = run_train(st, out, workspace(workdir), progress, prefetch=workers)
    import os
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))


class _Progress:
    def __init__(self, quiet: bool, total: int):
        import os
        self.on = not quiet and os.environ.get("RANK", "0") == "0"
        self.total = total

    def __enter__(self):
        if not self.on:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=err)
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.total, info="")
        return self.update

    def update(self, logged: dict) -> None:
        self.bar.update(self.task, completed=logged["step"] + 1, info=f"loss {logged['loss']:.4f} lr {logged['lr']:.2e}")

    def __exit__(self, *exc):
        if self.on:
            self.bar.__exit__(*exc)
        return False
