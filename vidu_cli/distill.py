"""`vidu distill`: distill the causal teacher into a few-step streaming student by DMD on the student's
own streaming rollouts (stages/distill/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.distill.dmd import DMDSettings
from stages.distill.loop import DistillSettings
from vidu_cli.options import Quiet, Workdir, option
from vidu_cli.report import clean_errors


def distill(
    from_: Path = option(DistillSettings, "init_from", "The teacher: a `vidu train --stage causal` checkpoint, or a bidirectional one (stage 1, distilled asymmetrically: needs --init-student).", "--from", default=...),
    out: Annotated[Path, typer.Option(help="Folder for the student's checkpoints, loss.jsonl and loss.png (re-run to resume).")] = ...,
    init_student: Optional[Path] = option(DistillSettings, "init_student", "Start the student (and its EMA) from this previous distilled student (its ema.safetensors) instead of the teacher.", show_default=False),
    steps: int = option(DistillSettings, "steps", "Generator steps in total."),
    batch: int = option(DistillSettings, "batch", "Rollouts per step."),
    student_steps: int = option(DistillSettings, "student_steps", "Denoising steps per chunk of the student."),
    chunks: int = option(DistillSettings, "chunks", "Chunks per rollout."),
    recache: bool = option(DistillSettings, "recache", "Roll out with LongLive's recache: a rollout's history is re-read under its new text at an instruction switch; the student then streams with recache by default (on the synth bench's event-like instructions it cost 35 points of instructions; benchmarks/RESULTS.md, session 61).", "--recache/--no-recache"),
    critic_updates: int = option(DistillSettings, "critic_updates", "Critic steps per generator step."),
    ode_warmup: int = option(DistillSettings, "ode_warmup", "First steps of ODE regression on the teacher's few-step trajectories instead of DMD."),
    ode_substeps: int = option(DistillSettings, "ode_substeps", "Teacher Euler steps per phase of the student's schedule in the ODE warm-up."),
    critic_warmup: int = option(DistillSettings, "critic_warmup", "Then steps that train the critic alone (use with --init-student against another teacher)."),
    guidance: float = option(DMDSettings, "guidance", "Classifier-free guidance of the real score (the teacher)."),
    guide: str = option(DMDSettings, "guide", "What the real score's unconditional pass nulls."),
    guidance_min_level: float = option(DMDSettings, "guidance_min_level", "Guide the real score only at noise levels from this..."),
    guidance_max_level: float = option(DMDSettings, "guidance_max_level", "...to this (unguided elsewhere)."),
    sync_weight: float = option(DistillSettings, "sync_weight", "Weight of the sync reward: the teachers' sync loss on the student's rollout (needs --lipsync)."),
    lipsync: Optional[Path] = option(DistillSettings, "lipsync", "A lip-sync discriminator file (the recipe's lipsync phase): the sync reward's, and with it loss_sync is logged at any --sync-weight.", show_default=False),
    pcm_weight: float = option(DistillSettings, "pcm_weight", "Weight of the PCM regularizer (0: pure DMD)."),
    pcm_substeps: int = option(DistillSettings, "pcm_substeps", "Teacher ODE steps per phase of the student's schedule (PCM)."),
    pcm_distance: str = option(DistillSettings, "pcm_distance", "PCM's distance: codec = the teacher's autoencoder decodes both chunks and its encoder's feature maps are compared LPIPS-style (unit channels, no learned weights); latent = the latents' squared difference; lpips = LPIPS with --lpips weights; auto = lpips with --lpips, else codec."),
    lpips: Optional[Path] = option(DistillSettings, "lpips", "LPIPS's backbone for --pcm-distance lpips: a torchvision AlexNet or VGG16 state dict file (nothing is downloaded).", show_default=False),
    lpips_lin: Optional[Path] = option(DistillSettings, "lpips_lin", "LPIPS's linear layers (lin0..lin4, the lpips package's weights/v0.1 format); default: those in the --lpips file, else the installed lpips package's (pip install lpips, vidu's optional extra of that name).", show_default=False),
    compile: bool = option(DistillSettings, "compile", "Compile the DiT blocks of the teacher, student and critic with torch.compile (CUDA only).", "--compile/--no-compile"),
    lr: float = option(DistillSettings, "lr", "Peak learning rate of the student (AdamW)."),
    critic_lr: float = option(DistillSettings, "critic_lr", "Peak learning rate of the critic."),
    warmup: int = option(DistillSettings, "warmup", "Linear warmup steps, then cosine decay."),
    ema: float = option(DistillSettings, "ema", "EMA decay of the student's kept weights."),
    save_every: int = option(DistillSettings, "save_every", "Checkpoint every N steps."),
    samples: int = option(DistillSettings, "samples", "Synthetic clips giving the conditions (cycled)."),
    data: Optional[Path] = option(DistillSettings, "data", "Take the conditions from this manifest (vidu synth / vidu embed) instead.", show_default=False),
    seed: int = option(DistillSettings, "seed", "Seed of data, rollouts and noise."),
    render_overlap: int = option(DistillSettings, "render_overlap", "Roll out while the clips render (with --workers): the draws start on the first batch's clips and each further clip joins after this many more samples (0: every clip rendered first)."),
    workers: Annotated[int, typer.Option(min=0, help="Processes rendering the clips that give the conditions (up front, or beside the rollouts with --render-overlap; 0: each clip rendered here when first drawn).")] = 0,
    workdir: Workdir = None,
    quiet: Quiet = False,
) -> None:
    """Distill a causal teacher into a few-step student that `vidu stream --ckpt` runs with no flags;
    re-running the same command resumes. A bidirectional teacher (stage 1) is distilled into a warm
    student (--init-student) by whole-clip scores, skipping stage 2.

    Example: vidu distill --from runs/causal/step-000300/ema.safetensors --out runs/student --steps 400
    """
    from manifests.io import workspace
    from stages.distill.loop import distill_run
    from vidu_cli.train import _Progress
    with clean_errors():
        st = DistillSettings(steps=steps, batch=batch, lr=lr, critic_lr=critic_lr, warmup=warmup, ema=ema,
                             save_every=save_every, seed=seed, student_steps=student_steps,
                             critic_updates=critic_updates, critic_warmup=critic_warmup, ode_warmup=ode_warmup,
                             ode_substeps=ode_substeps, chunks=chunks, recache=recache, init_from=str(from_),
                             init_student=str(init_student) if init_student else None, samples=samples,
                             sync_weight=sync_weight, lipsync=str(lipsync) if lipsync else None,
                             pcm_weight=pcm_weight, pcm_substeps=pcm_substeps, pcm_distance=pcm_distance,
                             lpips=str(lpips) if lpips else None, lpips_lin=str(lpips_lin) if lpips_lin else None,
                             data=str(data) if data else None, compile=compile, render_overlap=render_overlap, dmd=DMDSettings(guidance=guidance, guide=guide, guidance_min_level=guidance_min_level,
                                             guidance_max_level=guidance_max_level))
        with _Progress(quiet, steps) as progress:
            summary = distill_run(st, out, workspace(workdir), progress, prefetch=workers)
    print(json.dumps(summary))
