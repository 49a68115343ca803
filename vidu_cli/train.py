from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vidu_cli.options import Quiet, Workdir
from vidu_cli.report import clean_errors, err


def train(
    stage: Annotated[str, typer.Option(help="bidirectional (stage 1) | causal (stage 2).")],
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, codec, loss.jsonl and loss.png (re-run to resume).")],
    from_: Annotated[Optional[Path], typer.Option("--from", help="Start from this checkpoint (stage 2: the bidirectional teacher).")] = None,
    preset: Annotated[str, typer.Option(help="Model preset: tiny | small (trained on the synthetic avatar world).")] = "tiny",
    steps: Annotated[int, typer.Option(help="Optimisation steps in total.")] = 200,
    batch: Annotated[int, typer.Option(help="Global batch (split across torchrun processes).")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-4,
    warmup: Annotated[int, typer.Option(help="Linear warmup steps, then cosine decay.")] = 20,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clip.")] = 1.0,
    ema: Annotated[float, typer.Option(help="EMA decay of the kept weights.")] = 0.999,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing per block.")] = False,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    samples: Annotated[int, typer.Option(help="Synthetic training clips (cycled).")] = 256,
    data: Annotated[Optional[Path], typer.Option(help="Train on this manifest instead of clips rendered on the fly: synth (vidu synth) or samples (vidu embed, embedded at the same --preset).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data, noise and initialisation.")] = 0,
    shift: Annotated[float, typer.Option(help="Noise-level shift of the flow-matching schedule.")] = 5.0,
    p_teacher_forcing: Annotated[float, typer.Option(help="Stage 2: probability of teacher forcing (else diffusion forcing).")] = 0.5,
    chunk_frames: Annotated[int, typer.Option(help="Stage 2: latent frames per causal chunk.")] = 1,
    tau_dist: Annotated[str, typer.Option(help="Stage 2: history noise distribution, uniform | shifted.")] = "uniform",
    tau_max: Annotated[float, typer.Option(help="Stage 2: largest history noise level.")] = 0.5,
    workdir: Workdir = None,
    quiet: Quiet = False,
) -> None:
    """Train a teacher stage on the synthetic avatar world; re-running the same command resumes.

    Example: vidu train --stage bidirectional --preset tiny --out runs/bi --steps 300
    Example: vidu train --stage causal --from runs/bi/step-000300/ema.safetensors --out runs/causal
    Example: vidu train --stage bidirectional --preset tiny --data $(vidu embed --from captioned.parquet) --out runs/real
    Example: torchrun --nproc-per-node 2 $(which vidu) train --stage bidirectional --out runs/bi2
    """
    from manifests.io import workspace
    from stages.train.loop import TrainSettings, train as run_train
    from stages.train.objectives import ObjectiveSettings
    with clean_errors():
        st = TrainSettings(stage=stage, preset=preset, steps=steps, batch=batch, lr=lr, warmup=warmup,
                           weight_decay=weight_decay, grad_clip=grad_clip, ema=ema, grad_ckpt=grad_ckpt,
                           save_every=save_every, seed=seed, samples=samples, data=str(data) if data else None,
                           init_from=str(from_) if from_ else None,
                           objective=ObjectiveSettings(shift=shift, p_teacher_forcing=p_teacher_forcing,
                                                       chunk_frames=chunk_frames, tau_dist=tau_dist, tau_max=tau_max))
        with _Progress(quiet, steps) as progress:
            summary = run_train(st, out, workspace(workdir), progress)
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
