"""benchmarks/teacher_recipe.py on the tiny preset, on CPU: every phase end to end (autoencoder, the
lip-sync discriminator, stage 1, stage 2, eval), each one resuming from a copy of what the previous phase shipped; shipped files are bf16,
under the size limit (sharded when a model is larger) and load back bit for bit; the committed text table
covers every text training and the synth bench use and equals MiniLM's features."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("teacher_recipe", ROOT / "benchmarks" / "teacher_recipe.py")
recipe = importlib.util.module_from_spec(spec)
sys.modules["teacher_recipe"] = recipe
spec.loader.exec_module(recipe)

MINILM_ROUNDING = 1e-4   # MiniLM's features across transformers releases (float32 kernel order)
FAST = ["--preset", "tiny", "--steps", "2", "--workers", "0", "--minutes", "4"]


def phase(name: str, work: Path, out: Path, monkeypatch, *extra: str) -> dict:
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("VIDU_TEXT_TABLE", str(recipe.TEXT_TABLE))   # what main() sets, undone after the test
    return recipe.main(["--phase", name, "--work", str(work), *FAST, *extra])


def carry(out: Path, work: Path) -> None:
    """What the lead does between GPU runs: the files a phase returned become the next run's work folder."""
    for f in out.rglob("*.safetensors*"):
        dest = work / f.relative_to(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)


def test_recipe_phases_end_to_end(tmp_path, monkeypatch, capsys):
    """All four phases, each in a fresh folder holding only what the one before shipped."""
    works = [tmp_path / f"w{i}" for i in range(4)]
    outs = [tmp_path / f"out{i}" for i in range(4)]
    ae = phase("autoencoder", works[0], outs[0], monkeypatch)
    assert ae["train"]["steps"] == 2 and set(ae["shipped"]) == {"codec.safetensors"}
    carry(outs[0], works[1])
    import stages.train.lipsync as lipsync
    fits, fit = [], lipsync.fit
    monkeypatch.setattr(lipsync, "fit", lambda *a, **k: fits.append(a[3] if len(a) > 3 else k.get("batch")) or fit(*a, **k))
    ls = phase("lipsync", works[1], outs[0], monkeypatch)           # the discriminator, beside the codec
    assert set(ls["eval"]["held_out"]) >= {"auc_shifted", "auc_other_clip", "auc_window"} and ls["used_by_teachers"]
    assert fits == [recipe.RECIPES["tiny"].lipsync["batch"]] == [64]   # the recipe's batch reaches the fit
    carry(outs[0], works[1])
    bi = phase("bidirectional", works[1], outs[1], monkeypatch)
    assert bi["train"]["steps"] == 2 and bi["train"]["resumed_from"] is None
    assert set(bi["shipped"]) == {"bidirectional/ema.safetensors", "codec.safetensors"}
    assert bi["settings"]["objective"]["sync_weight"] == 0.02      # the teachers add the sync loss it passed
    assert bi["settings"]["objective"]["lipsync"] == str(works[1] / "lipsync.safetensors")
    # the bidirectional teacher on the bench's cases, sampled whole (no stream) in windows of its clip length
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))   # spawned processes (parent's sys.path) import the recipe
    whole = phase("eval", works[1], tmp_path / "outb", monkeypatch, "--teacher", "bidirectional", "--seconds", "2")
    assert whole["streams"] == 0 and whole["whole"]["steps"] == 2 and whole["whole"]["gen_fps"] > 0
    assert [r["index"] for r in whole["rows"]] == [0, 1] and whole["summary"]["clips"] == 2
    for r in whole["rows"]:
        assert r["stream_fps"] is None and r["truth"]["mouth_r"] > 0.9 and r["mouth_r"] is not None
    assert sorted(p.name for p in (tmp_path / "outb").iterdir()) == ["eval_case0.png", "eval_case1.png", "recipe_eval.json"]
    one = phase("eval", works[1], tmp_path / "outb1", monkeypatch, "--teacher", "bidirectional", "--seconds", "2",
                "--cases", "1", "--compile")   # the drift clip's path: one case, scored over the workers
    assert one["rows"][0]["truth"] == whole["rows"][0]["truth"] and one["rows"][0]["mouth_r"] is not None
    assert one["stream"]["compile"] is True and "compile" not in whole["stream"]     # (compiled on a GPU only)
    # no model: the same cases' ground truth through W's codec, scored as generated (the bench's ceiling)
    ceiling = phase("eval", works[1], tmp_path / "outc", monkeypatch, "--teacher", "codec", "--seconds", "2")
    assert ceiling["checkpoint"] == str(works[1] / "codec.safetensors") and ceiling["streams"] == 0
    assert [r["truth"] for r in ceiling["rows"]] == [r["truth"] for r in whole["rows"]]
    assert all(r["identity_error"] != r["truth"]["identity_error"] for r in ceiling["rows"])   # a few-step codec
    assert "the ground truth through the codec" in recipe.table(ceiling).splitlines()[0]
    for wrong in (["clips"], ["eval", "--from", str(works[1] / "codec.safetensors")], ["eval", "--seconds", "600"]):
        with pytest.raises(SystemExit):
            phase(wrong[0], works[1], tmp_path / "outc2", monkeypatch, "--teacher", "codec", *wrong[1:])
    import ref_pose_probe                 # the reference-copying probe and its two arms, on this teacher
    probe = ref_pose_probe.main(["--from", str(works[1] / "bidirectional" / "ema.safetensors"), "--codec",
                                 str(works[1] / "codec.safetensors"), "--out", str(tmp_path / "rp"), "--clips", "1",
                                 "--steps", "1", "--batch", "1", "--samples", "2", "--ref-pose", "1"])
    assert set(probe) == {"start", "ref_pose 0.0", "ref_pose 1.0"} and probe["start"]["neutral ref"]["frames"]["posed"] > 0
    assert probe["start"]["turned ref"] != probe["start"]["neutral ref"]      # the reference reaches the model
    assert probe["ref_pose 1.0"]["train"]["steps"] == 1 and (tmp_path / "rp" / "ref_pose_probe.json").is_file()
    carry(outs[1], works[2])
    causal = phase("causal", works[2], outs[2], monkeypatch)
    assert causal["train"]["steps"] == 2 and causal["settings"]["init_from"] == str(works[2] / "bidirectional" / "ema.safetensors")
    again = phase("causal", works[2], outs[2], monkeypatch)        # re-run in the same folder: resumes out/latest
    assert again["train"]["resumed_from"] == 2 and again["train"]["steps"] == 2
    further = phase("causal", works[2], tmp_path / "more", monkeypatch, "--again", "--eyes-weight", "3",
                    "--ref-pose", "0.5")   # a later session: from the EMA
    assert further["settings"]["objective"]["ref_pose"] == 0.5 and causal["settings"]["objective"]["ref_pose"] == 0.0
    assert further["settings"]["init_from"] == str(works[2] / "causal" / "ema.safetensors")
    assert further["settings"]["objective"]["eyes_weight"] == 3.0 and causal["settings"]["objective"]["eyes_weight"] == 1.0
    logged = lambda run: [json.loads(x) for x in (works[2] / "runs" / run / "loss.jsonl").read_text().splitlines()]  # noqa: E731
    assert all(h["eyes_share"] > 0 for h in logged("causal-again-1"))
    assert all("eyes_share" not in h and h["mouth_share"] > 0 for h in logged("causal"))   # control: weight 1, no term
    assert further["train"]["resumed_from"] is None and further["again"]
    assert (causal["settings"]["seed"], further["settings"]["seed"]) == (0, 1)     # new clips
    # the next phase in the same folder starts its own run (session 55: it found the last one's and stopped)
    third = phase("causal", works[2], tmp_path / "third", monkeypatch, "--again")
    assert third["settings"]["seed"] == 2 and third["train"]["resumed_from"] is None
    assert recipe.read_state_dict(tmp_path / "more" / "causal" / "ema.safetensors").keys() == \
        recipe.read_state_dict(outs[2] / "causal" / "ema.safetensors").keys()
    for out in outs[:3]:
        for f in out.rglob("*.safetensors"):
            assert f.stat().st_size <= recipe.SHIP_LIMIT
            assert all(v.dtype == torch.bfloat16 for v in recipe.read_state_dict(f).values())
    carry(outs[2], works[3])
    ev = phase("eval", works[3], outs[3], monkeypatch)
    rows = json.loads((outs[3] / "recipe_eval.json").read_text())["rows"]
    assert [r["index"] for r in rows] == [0, 1] and ev["summary"]["clips"] == 2
    for r in rows:   # the ground truth through the same scoring follows its own audio and not the control's
        assert r["truth"]["mouth_r"] > 0.9 and abs(r["truth"]["mouth_r_control"]) < 0.5
        assert set(r) >= {"mouth_r", "mouth_r_control", "identity_error", "instr_success", "drift_ratios", "stream_fps"}
    assert sorted(p.name for p in outs[3].iterdir()) == ["eval_case0.png", "eval_case1.png", "recipe_eval.json"]
    # the per-style breakdown covers every row once, each row's style being its character's (truth's the same)
    assert all(r["style"] == r["truth"]["style"] for r in rows)
    assert {k: v["clips"] for k, v in ev["summary"]["by_style"].items()} == \
        {k: sum(r["style"] == k for r in rows) for k in {r["style"] for r in rows}}
    assert all(r["truth"]["instr_hit"] >= r["truth"]["instr_success"] for r in rows if r["instr_events"])
    two = phase("eval", works[3], tmp_path / "out4", monkeypatch, "--streams", "2")   # one case per process
    assert two["streams"] == 2 and [r["index"] for r in two["rows"]] == [0, 1]
    for a, b in zip(rows, two["rows"]):                  # the same streams, whichever process ran them
        assert (a["mouth_r"], a["identity_error"]) == (b["mouth_r"], b["identity_error"])
    idle = phase("eval", works[3], tmp_path / "out4i", monkeypatch, "--idle", "--cases", "1", "--seconds", "4")
    assert idle["bench"] == "synth-idle" and ev["bench"] == "synth"    # synth-idle's case 0: told nothing
    (r,) = idle["rows"]
    assert (r["seed"], r["voice"]) == (rows[0]["seed"], rows[0]["voice"]) and r["events"] == []
    from stages.eval.bench.cases import synth_case
    assert synth_case(0, 64, 4.0).actions               # told, case 0 turns right within those 4 s
    assert r["instr_events"] == 0 and idle["summary"]["truth_spurious_per_min"] == 0.0
    with pytest.raises(SystemExit, match="untold cases"):      # the starter ships from the instructed bench only
        recipe.starter_phase(works[3], tmp_path / "out4i" / "recipe_eval.json", tmp_path / "starter_idle")
    # stage 3 from the shipped causal teacher; the student streams at its own 3 steps with no flags
    works.append(tmp_path / "w4")
    carry(outs[2], works[4])
    dist = phase("distill", works[4], tmp_path / "out5", monkeypatch)
    assert dist["train"]["steps"] == 2 and dist["settings"]["init_from"] == str(works[4] / "causal" / "ema.safetensors")
    assert set(dist["shipped"]) == {"student/ema.safetensors", "codec.safetensors"}
    assert set(dist["loss_first"]) >= {"loss", "loss_critic", "loss_dmd"}
    assert dist["settings"]["render_overlap"] == dist["fit"]["render_overlap"] >= 1     # rollouts beside the rendering
    again = phase("distill", works[4], tmp_path / "out5", monkeypatch)   # run again on the held machine: resumes
    assert again["train"]["resumed_from"] == 2 and again["train"]["steps"] == 2
    carry(outs[2], tmp_path / "w5")          # a later session: the teacher, and the last student as the warm start
    warm = phase("distill", tmp_path / "w5", tmp_path / "out7", monkeypatch, "--init-student", str(tmp_path / "out5" / "student"))
    assert warm["settings"]["init_student"] == str(tmp_path / "out5" / "student" / "ema.safetensors")
    assert warm["settings"]["critic_warmup"] == 1 and dist["settings"]["critic_warmup"] == 0
    carry(outs[1], tmp_path / "wb")          # stage 1 distilled straight into a student file (the starter's way)
    asym = phase("distill", tmp_path / "wb", tmp_path / "outb2", monkeypatch, "--teacher", "bidirectional",
                 "--init-student", str(tmp_path / "out5" / "student" / "ema.safetensors"))
    assert asym["settings"]["init_from"] == str(tmp_path / "wb" / "bidirectional" / "ema.safetensors")
    assert asym["train"]["steps"] == 2 and "loss_dmd" in asym["loss_first"] and asym["settings"]["critic_warmup"] == 1
    assert recipe.read_metadata(tmp_path / "outb2" / "student" / "ema.safetensors")["lineage"][-1]["teacher"] == "bidirectional"
    with pytest.raises(SystemExit):                       # a student is no teacher
        phase("distill", tmp_path / "wb", tmp_path / "outb3", monkeypatch, "--teacher", "student")
    carry(outs[2], tmp_path / "w6")          # a fresh student with the ODE warm-up first
    ode = phase("distill", tmp_path / "w6", tmp_path / "out8", monkeypatch, "--ode-warmup", "1")
    assert ode["settings"]["ode_warmup"] == 1 and "loss_ode" in ode["loss_first"] and "loss_dmd" in ode["loss_last_10pct"]
    assert warm["train"]["resumed_from"] is None
    # the ablation's arms: PCM and the sync reward (the lipsync phase's discriminator in W), their gradients measured
    with pytest.raises(SystemExit):                       # a teacher stage's loss weight, refused before any work
        phase("distill", tmp_path / "w6", tmp_path / "out8", monkeypatch, "--eyes-weight", "3")
    with pytest.raises(SystemExit, match="run --phase lipsync first"):
        phase("distill", tmp_path / "w6", tmp_path / "out8", monkeypatch, "--sync-weight", "0.1")
    carry(outs[2], tmp_path / "w8")
    shutil.copyfile(outs[0] / "lipsync.safetensors", tmp_path / "w8" / "lipsync.safetensors")
    both = phase("distill", tmp_path / "w8", tmp_path / "out10", monkeypatch, "--pcm-weight", "0.5", "--sync-weight", "0.1")
    assert (both["settings"]["pcm_weight"], both["settings"]["sync_weight"]) == (0.5, 0.1)
    assert both["settings"]["lipsync"] == str(tmp_path / "w8" / "lipsync.safetensors") and "auc_shifted" in both["lipsync_eval"]
    assert set(both["loss_first"]) >= {"loss_dmd", "loss_pcm", "loss_sync", "gnorm_dmd", "gnorm_pcm", "gnorm_sync"}
    assert "gnorm_dmd" not in dist["loss_first"] and dist["lipsync_eval"] is None      # pure DMD: one term
    # a later session that kept only the shipped student (no teacher in W): stage 2 continues from it
    lone = tmp_path / "lone" / "student.safetensors"              # carried without its codec file beside it
    lone.parent.mkdir()
    shutil.copyfile(tmp_path / "out5" / "student" / "ema.safetensors", lone)
    codec = str(outs[0] / "codec.safetensors")
    with pytest.raises(SystemExit):                                # --from continues a stage: needs --again
        phase("causal", tmp_path / "w7", tmp_path / "out9", monkeypatch, "--from", str(lone), "--codec", codec)
    rebuilt = phase("causal", tmp_path / "w7", tmp_path / "out9", monkeypatch, "--again", "--from", str(lone),
                    "--codec", codec)
    assert rebuilt["settings"]["init_from"] == str(tmp_path / "w7" / "causal" / "ema.safetensors")
    assert rebuilt["train"]["steps"] == 2 and rebuilt["again"]
    with pytest.raises(SystemExit):               # --codec naming W's own codec file: nothing to copy, no error
        recipe.main(["--phase", "starter", "--work", str(tmp_path / "w7"), "--codec", str(tmp_path / "w7" / "codec.safetensors")])
    assert "needs --scores" in capsys.readouterr().err
    lineage = recipe.read_metadata(tmp_path / "out9" / "causal" / "ema.safetensors")["lineage"]
    assert [r["stage"] for r in lineage][-2:] == ["distill", "causal"]
    # the same student moved onto another codec (a retrained autoencoder): refused unless --recode
    from safetensors import safe_open
    from safetensors.torch import save_file
    other = tmp_path / "other_codec.safetensors"
    with safe_open(codec, "pt") as f:
        sd = {k: f.get_tensor(k) * (1.01 if f.get_tensor(k).is_floating_point() else 1) for k in f.keys()}
        save_file(sd, other, metadata=f.metadata())
    with pytest.raises(ValueError, match="--recode"):
        phase("causal", tmp_path / "w10", tmp_path / "out12", monkeypatch, "--again", "--from", str(lone),
              "--codec", str(other))
    with pytest.raises(SystemExit):                                # --recode names the new codec
        phase("causal", tmp_path / "w11", tmp_path / "out13", monkeypatch, "--again", "--from", str(lone), "--recode")
    recoded = phase("causal", tmp_path / "w12", tmp_path / "out14", monkeypatch, "--again", "--from", str(lone),
                    "--codec", str(other), "--recode")
    assert recoded["settings"]["recode"] and recoded["train"]["steps"] == 2
    rec = recipe.read_metadata(tmp_path / "out14" / "causal" / "ema.safetensors")["sampling"]["codec"]
    assert other.read_bytes() == (tmp_path / "out14" / "codec.safetensors").read_bytes()
    assert hashlib.sha256(other.read_bytes()).hexdigest().startswith(rec["sha256"])
    carry(tmp_path / "out5", works[4])
    st = phase("eval", works[4], tmp_path / "out6", monkeypatch, "--teacher", "student")
    assert st["summary"]["clips"] == 2
    sampling = recipe.read_metadata(works[4] / "student" / "ema.safetensors")["sampling"]
    assert (sampling["stage"], sampling["steps"], sampling["guidance"]) == ("distill", 3, 1.0)
    # the starter phase ships the model an eval scored (here the student) with its codec beside it, and the
    # eval phase scores it there (--from, no codec in W): the same numbers as from W
    starter = recipe.starter_phase(works[4], tmp_path / "out6" / "recipe_eval.json", tmp_path / "starter")
    assert st["stream"]["steps"] == 2                                # FAST's --stream-steps: what the eval streamed
    assert starter["starter"]["model"] == "distilled student, 2 steps"      # ... is what the starter records
    assert recipe.read_metadata(tmp_path / "starter" / "model.safetensors")["sampling"]["steps"] == 2
    assert starter["starter"]["scores"]["mouth_r"] == st["summary"]["mouth_r"]
    shipped = phase("eval", tmp_path / "bare", tmp_path / "out6b", monkeypatch, "--from",
                    str(tmp_path / "starter" / "model.safetensors"))
    speedless = lambda s: {k: v for k, v in s.items() if k != "stream_fps"}  # noqa: E731
    assert speedless(shipped["summary"]) == speedless(st["summary"])
    assert shipped["checkpoint"] == str(tmp_path / "starter" / "model.safetensors")
    assert not (tmp_path / "bare" / "codec.safetensors").exists()
    with pytest.raises(SystemExit, match="not the work folder's"):   # scores of a file outside W
        recipe.starter_phase(works[4], tmp_path / "out6b" / "recipe_eval.json", tmp_path / "starter3")
    with pytest.raises(SystemExit, match="not an eval"):            # the scores of a training phase
        recipe.starter_phase(works[4], outs[2] / "recipe_causal.json", tmp_path / "starter2")
    # the ablation driver (benchmarks/distill_arms.py): arms trained side by side in processes of their own,
    # then each student and the teacher at a student's step count through the bench, the best lip sync returned
    spec = importlib.util.spec_from_file_location("distill_arms", ROOT / "benchmarks" / "distill_arms.py")
    arms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arms)
    w9, out11 = tmp_path / "w9", tmp_path / "out11"
    carry(outs[2], w9)
    shutil.copyfile(outs[0] / "lipsync.safetensors", w9 / "lipsync.safetensors")
    monkeypatch.setenv("OUT", str(out11))
    for bad in ("dmd:0", "dmd:0:0:1:2", "dmd:x:0"):
        with pytest.raises(SystemExit, match="NAME:PCM_WEIGHT:SYNC_WEIGHT"):
            arms.main(["train", "--work", str(w9), "--arms", bad])
    tr = arms.main(["train", "--work", str(w9), "--arms", "dmd:0:0", "both:0.5:0.1:5", "--preset", "tiny", "--steps", "2",
                    "--workers", "0", "--minutes", "4"])
    assert [(tr[n]["settings"]["pcm_weight"], tr[n]["settings"]["sync_weight"], tr[n]["settings"]["dmd"]["guidance"],
             tr[n]["train"]["steps"]) for n in ("dmd", "both")] == [(0.0, 0.0, 3.0, 2), (0.5, 0.1, 5.0, 2)]
    assert all(tr[n]["settings"]["lipsync"] == str(tmp_path / f"w9_{n}" / "lipsync.safetensors") for n in ("dmd", "both"))
    assert "loss_sync" in tr["dmd"]["loss_first"] and "gnorm_dmd" not in tr["dmd"]["loss_first"]   # measured only
    assert {"gnorm_dmd", "gnorm_pcm", "gnorm_sync"} <= set(tr["both"]["loss_first"])
    assert (tmp_path / "w9_both" / "causal").resolve() == (w9 / "causal").resolve()       # one teacher, linked
    ev = arms.main(["eval", "--work", str(w9), "--arms", "dmd", "both", "--preset", "tiny", "--cases", "1",
                    "--streams", "1", "--workers", "0", "--teacher-steps", "2", "--ship"])
    assert set(ev) == {"dmd", "both", "teacher@2", "shipped"} and all("summary" in ev[n] for n in ("dmd", "both", "teacher@2"))
    best = ev["shipped"]
    assert (out11 / "student" / "ema.safetensors").read_bytes() == \
        (tmp_path / f"w9_{best}" / "student" / "ema.safetensors").read_bytes()
    assert json.loads((out11 / "recipe_eval.json").read_text())["summary"] == ev[best]["summary"]
    assert sorted(p.name for p in out11.iterdir()) == ["arms_eval.json", "arms_train.json", "recipe_eval.json", "student"]


def test_ship_shards_under_the_limit_and_join_back(tmp_path):
    """A checkpoint over the limit leaves as shards + index, each file within the limit, and comes back
    as the same bf16 tensors with its metadata (so load_dit finds the config) read through the index; a
    control: the limit is real (one file when it allows)."""
    from models.checkpoint import load_dit, read_metadata, save_model
    from models.config import preset
    from models.dit import DiT
    cfg = preset("tiny")
    torch.manual_seed(0)
    src = save_model(tmp_path / "ema.safetensors", DiT(cfg.dit), cfg, [{"stage": "test"}], {"sampling": {"steps": 3}})
    limit = 200 * 1024
    files = recipe.ship(src, tmp_path / "ship", "ema", limit=limit)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) >= 3 and files[-1].name == "ema.safetensors.index.json"
    assert all(f.stat().st_size <= limit for f in files)
    index = recipe.shipped(tmp_path / "ship", "ema")
    assert index == files[-1]
    want = {k: v.to(torch.bfloat16) for k, v in recipe.read_state_dict(src).items()}
    got = recipe.read_state_dict(index)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert read_metadata(index) == read_metadata(src)                   # the index reads as the file
    assert load_dit(index)[1] == cfg
    one = recipe.ship(src, tmp_path / "one", "ema", limit=recipe.SHIP_LIMIT)
    assert [f.name for f in one] == ["ema.safetensors"] and recipe.shipped(tmp_path / "one", "ema") == one[0]
    with pytest.raises(FileNotFoundError, match="run the phase before"):
        recipe.shipped(tmp_path / "none", "ema")
    with pytest.raises(ValueError, match="over the"):
        recipe.ship(src, tmp_path / "tiny", "ema", limit=4096)


def test_text_table_covers_the_world_and_matches_minilm():
    from models.config import NEUTRAL_TEXT
    from models.encoders import TextEncoder, TextTable
    from stages.synth import ACTIONS
    table = TextTable(recipe.TEXT_TABLE)
    assert set(table.texts) == {NEUTRAL_TEXT, *ACTIONS}
    enc = TextEncoder("minilm", max_len=512)
    for i, text in enumerate(table.texts):
        # equal to float32 rounding: the table was written by another transformers release (5.24 differs
        # by ~1e-5, a different kernel order); another text is off by O(0.1-1) (the control)
        assert (table([text])[0] - enc([text])[0]).abs().max() < MINILM_ROUNDING
        other = table.texts[(i + 1) % len(table.texts)]
        assert (table([other])[0][:1] - enc([text])[0][:1]).abs().max() > 100 * MINILM_ROUNDING
    assert recipe.TEXT_TABLE.stat().st_size < 256 * 1024
    with pytest.raises(KeyError):
        table(["wave"])


def test_text_encoder_is_the_table_when_one_is_named(monkeypatch):
    """Training and `vidu stream` take their text encoder from one function: the table when
    $VIDU_TEXT_TABLE names one (the GPU image has no MiniLM), trimmed like MiniLM to the model's length."""
    from models.encoders import TextEncoder, TextTable, minilm_path, text_encoder
    texts = ["blink", "a person talking to the camera"]
    monkeypatch.delenv("VIDU_TEXT_TABLE", raising=False)
    assert isinstance(text_encoder("minilm", max_len=32), TextEncoder)      # control: no table named
    monkeypatch.setenv("VIDU_TEXT_TABLE", str(recipe.TEXT_TABLE))
    enc = text_encoder("minilm", max_len=32)                                 # `small`'s text length: the texts fit
    assert isinstance(enc, TextTable) and enc.dim == 384
    assert (enc(texts) - TextEncoder("minilm", max_len=32)(texts)).abs().max() < MINILM_ROUNDING
    with pytest.raises(FileNotFoundError, match="umT5"):                     # a MiniLM table is no umT5
        text_encoder("umt5", max_len=32)
    assert isinstance(text_encoder("minilm", minilm_path(), max_len=32), TextEncoder)   # a given model wins


def test_a_table_of_umt5_features_serves_umt5(tmp_path, monkeypatch):
    """A table records its encoder's kind; one written as umT5's (serve_load.py's random stand-in for the
    1.3B preset on the GPU image) is what text_encoder("umt5") returns, and only for its texts."""
    from models.checkpoint import save_safetensors
    from models.encoders import TextTable, text_encoder
    feats = torch.randn(3, 4096)
    save_safetensors(tmp_path / "t.safetensors", {"t0": feats}, {"texts": ["hello"], "encoder": "umt5"})
    monkeypatch.setenv("VIDU_TEXT_TABLE", str(tmp_path / "t.safetensors"))
    enc = text_encoder("umt5", max_len=512)
    assert isinstance(enc, TextTable) and enc.dim == 4096 and torch.equal(enc(["hello"])[0], feats)
    assert not isinstance(text_encoder("minilm", max_len=32), TextTable)       # control: not for MiniLM


GPU_IMAGE_LACKS = ("duckdb", "av")      # the device image has torch and triton, not these (carried wheels aside)

_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ImportError("not on the GPU image: " + name)
sys.meta_path.insert(0, Block())
"""


def test_the_recipe_runs_without_what_the_gpu_image_lacks():
    """What the recipe runs on the GPU machine (its phases, the render workers' clips, the bench's scores,
    the stream session, the hour's per-frame scoring) imports without DuckDB and PyAV: two GPU runs once
    died at their first rendered clip on that, a third at the hour's first scoring. Control: the blocker does stop a module that needs PyAV."""
    import subprocess
    code = _BLOCK.format(names=set(GPU_IMAGE_LACKS)) + """
sys.path.insert(0, "benchmarks")
import teacher_recipe
import long_stream
from models.config import preset
from stages.train.data import render_clip
from stages.eval.bench.synthscore import frame_stats, synth_scores
from stages.stream.session import load_parts, run_session
c = render_clip(7, preset("tiny"), split="eval", truth=True)
print(c["frames"].shape, c["truth"]["frames"], *map(len, frame_stats(c["frames"])))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["(17,", "64,", "64,", "3)", "17", "17", "16"]
    control = subprocess.run([sys.executable, "-c", _BLOCK.format(names=set(GPU_IMAGE_LACKS)) + "import stages.sense.media"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert control.returncode != 0 and "not on the GPU image: av" in control.stderr


def test_the_teachers_use_the_discriminator_only_past_its_held_out_bar(tmp_path):
    """A lip-sync discriminator below the recipe's min_auc is shipped but not used (sync weight 0); at
    or above it, stage settings carry the sync loss; none: none."""
    import dataclasses
    from stages.train.lipsync import LipSync, LipSyncConfig, save_lipsync
    from models.config import preset
    rec = dataclasses.replace(recipe.RECIPES["tiny"], lipsync={**recipe.RECIPES["tiny"].lipsync, "min_auc": 0.7})
    (tmp_path / "codec.safetensors").write_bytes(b"")            # stage 1 only names it
    assert recipe.stage_settings(rec, "bidirectional", tmp_path, 2, None).objective.sync_weight == 0.0
    model = LipSync(LipSyncConfig.for_model(preset("tiny")))
    for auc, used in ((0.69, False), (0.7, True)):
        save_lipsync(tmp_path / recipe.LIPSYNC, model, {"eval": {"auc_shifted": auc}})
        ob = recipe.stage_settings(rec, "bidirectional", tmp_path, 2, None).objective
        assert (ob.sync_weight, ob.lipsync) == ((0.02, str(tmp_path / recipe.LIPSYNC)) if used else (0.0, None))
    # nor does the distill phase reward sync through a discriminator below the bar (it stops before any work)
    save_lipsync(tmp_path / recipe.LIPSYNC, model, {"eval": {"auc_shifted": 0.69}})
    with pytest.raises(SystemExit, match="passed its held-out check"):
        recipe.distill_phase(rec, tmp_path, tmp_path, 5.0, 1, time.perf_counter(), sync_weight=0.03)
    assert not (tmp_path / "runs").exists()


def _overfit_script():
    spec = importlib.util.spec_from_file_location(
        "overfit_identity", Path(__file__).resolve().parents[1] / "benchmarks" / "overfit_identity.py")
    oi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oi)
    return oi


def test_the_overfit_checks_chance_level_and_guidance_scales():
    """The control's chance level skips a held-out clip whose mouth never moves (it has no r; it crashed a
    24-clip run), and --guidance takes scales >= 1, keyed as the eval rows are."""
    oi = _overfit_script()
    t = np.linspace(0, 6, 40)
    a, b, still = np.sin(t), np.sin(1.7 * t) + 0.3 * t, np.full(40, 0.2)
    expected = (abs(np.corrcoef(a, b)[0, 1]) + 0.0) / 2        # (b vs a), (still vs b: r 0), (a vs still: none)
    assert oi.chance_abs_r([a, b, still]) == pytest.approx(expected, abs=1e-12)
    assert oi.chance_abs_r([a, b]) == pytest.approx(abs(np.corrcoef(a, b)[0, 1]), abs=1e-12)
    assert oi.scales("1,2,3.5") == [1.0, 2.0, 3.5]
    for bad in ("0.5", "2,x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            oi.scales(bad)
    assert [oi.guidance_key(g) for g in (1.0, oi.TEACHER_GUIDANCE, 3.0)] == ["unguided", "guided", "guidance 3"]


def test_the_overfit_check_scores_held_out_speech_against_the_codec_ceiling(tmp_path, monkeypatch):
    """benchmarks/overfit_identity.py (issue 15's CPU check), two steps: the ground-truth mouth survives the world
    codec at 128 px (the ceiling the trained model's r is read against, >= 0.75 on each clip), and an untrained
    model scores near zero on both its own speech and the control's. Negative control: each clip's coded mouth
    scored against the other clip's track is far below its ceiling."""
    oi = _overfit_script()
    monkeypatch.setenv("OUT", str(tmp_path))
    res = oi.main(["--clips", "2", "--held", "2", "--steps", "2", "--eval-every", "2", "--sample-steps", "2",
                   "--threads", "2", "--seen", "1"])
    assert json.loads((tmp_path / "overfit.json").read_text()) == json.loads(json.dumps(res))
    (run,) = res["runs"]
    assert len(run["codec_ceiling"]) == 2 and min(run["codec_ceiling"]) >= 0.75 and 0 <= run["chance_abs_r"] < 0.75
    assert max(run["codec_ceiling_control"]) < 0.4
    (e,) = run["evals"]
    assert e["step"] == 2 and set(e) >= {"unguided", "guided"} and set(e["seen"]) == {"unguided", "guided"}
    for row in (e, e["seen"]):
        for name in ("unguided", "guided"):
            assert abs(row[name]["mean_r"]) < 0.3 and row[name]["mean_abs_control_r"] < 0.3
            assert all(c["r_face_found"] == 1.0 for c in row[name]["clips"])
    assert len(e["seen"]["guided"]["clips"]) == 1 and len(e["guided"]["clips"]) == 2


def _eval_row(style: str, events: int, success: float, hit: float, sharp: float, classes: dict, truth: dict | None = None) -> dict:
    """An eval-phase row as _score gives it (the numbers a test needs; `truth`: the ground truth's)."""
    r = {"style": style, "instr_events": events, "instr_success": success if events else None,
         "instr_hit": hit if events else None, "instr_hit_chance": 0.25 if events else None,
         "instr_latency_s": [0.4] * round(success * events),
         "instr_classes": classes, "action_sharpness_ratio": sharp, "action_identity_error": 10 * sharp,
         "mouth_r": 0.5, "mouth_r_control": 0.1, "identity_error": 9.0, "spurious_per_min": 1.0,
         "spurious_idle_per_min": 0.0, "drift_ratios": {}, "stream_fps": 30.0,
         "instr_blockers": {"nod": {"blink": 1}} if "nod" in classes and hit > success else {}}
    if truth is not None:
        r["truth"] = _eval_row(style, events, truth["success"], truth["hit"], truth["sharp"], {})
    return r


def test_summarise_by_style_and_table():
    """The eval phase's summary pools instructions over events overall and per character style (2 human
    clips: 4 events, 1 strict success, 3 hits; not the clips' mean), with the truth's beside; the table
    prints one line per style with its per-class successes."""
    rows = [_eval_row("human", 3, 1 / 3, 2 / 3, 0.6, {"nod": {"told": 2, "success": 0, "hit": 1},
                                                        "blink": {"told": 1, "success": 1, "hit": 1}},
                      {"success": 1.0, "hit": 1.0, "sharp": 1.0}),
            _eval_row("anime", 1, 1.0, 1.0, 0.9, {"turn left": {"told": 1, "success": 1, "hit": 1}},
                      {"success": 1.0, "hit": 1.0, "sharp": 1.1}),
            _eval_row("human", 1, 0.0, 1.0, 0.8, {"nod": {"told": 1, "success": 0, "hit": 1}},
                      {"success": 0.0, "hit": 1.0, "sharp": 0.9})]
    s = recipe.summarise(rows)
    assert (s["instr_events"], s["instr_success"], s["instr_hit"]) == (5, pytest.approx(0.4), pytest.approx(0.8))
    assert (s["truth_instr_success"], s["truth_instr_hit"]) == (pytest.approx(0.8), pytest.approx(1.0))
    assert s["action_sharpness_ratio"] == pytest.approx(2.3 / 3) and s["truth_action_sharpness_ratio"] == pytest.approx(1.0)
    assert s["action_identity_error"] == pytest.approx(23 / 3) and s["truth_action_identity_error"] == pytest.approx(10.0)
    assert s["instr_blockers"] == {"nod": {"blink": 2}}
    h, a = s["by_style"]["human"], s["by_style"]["anime"]
    assert list(s["by_style"]) == ["anime", "human"]
    assert (h["clips"], h["instr_events"], h["instr_success"], h["instr_hit"]) == (2, 4, 0.25, 0.75)
    assert (h["truth_instr_success"], h["truth_instr_hit"], h["truth_action_sharpness_ratio"]) == (0.75, 1.0, pytest.approx(0.95))
    assert h["instr_classes"] == {"blink": {"told": 1, "success": 1, "hit": 1}, "nod": {"told": 3, "success": 0, "hit": 2}}
    assert (a["clips"], a["instr_events"], a["instr_success"], a["action_sharpness_ratio"]) == (1, 1, 1.0, 0.9)
    res = {"phase": "eval", "teacher": "causal", "checkpoint": "/w/causal/ema.safetensors", "bench": "synth", "stream": {},
           "seconds": 4.0, "eval_s": 1.0, "device": "cpu", "summary": s}
    lines = recipe.table(res).splitlines()
    assert "  told class fired in 0-1 s, others allowed 0.800 (by chance 0.250; truth 1.000)" in lines
    assert "  also fired in a told event's second: nod: blink 2" in lines
    assert "  sharpness during told actions / idle 0.767 (truth 1.000)" in lines
    assert ("  human: 2 clips, instructions 0.250 of 4 (hit 0.750; truth 0.750), r 0.500, spurious 1.000/min, identity "
            "error 9.000, sharpness told / idle 0.700 (truth 0.950); success / told: blink 1/1, nod 0/3") in lines
    assert lines[-2].startswith("  anime: 1 clips, instructions 1.000 of 1") and lines[-2].endswith("turn left 1/1")


def test_a_short_phase_renders_fewer_clips_and_trains(tmp_path, monkeypatch):
    """fitted_settings: when rendering every clip would take more than RENDER_SHARE of the phase time left,
    the phase renders fewer (never under a batch) and keeps the rest for training; a re-run resumes with
    the same count; a phase with time to spare renders them all (the control)."""
    small = recipe.RECIPES["small"]                       # 4096 stage-1 clips of batch 32
    monkeypatch.setattr(recipe, "probe", lambda *a, **k: {"step_s": 0.1, "clip_render_s": 0.15, "probe_s": 0.0})
    monkeypatch.setattr(recipe, "usable_lipsync", lambda *a: False)
    per_clip = recipe.RENDER_FACTOR["bidirectional"] * 0.15 / 15
    t = time.perf_counter()
    st, fit = recipe.fitted_settings(small, "bidirectional", tmp_path / "short", 3.5, 15, t)
    room = 3.5 * 60 - small.reserve_s - recipe.POOL_START_S
    assert fit["samples"] == st.samples == pytest.approx(recipe.RENDER_SHARE * room / per_clip, abs=2)   # 2171 of 4096
    # training runs beside the rendering: the whole room, a clip joining the draws every batch x per_clip / step_s
    assert st.samples < 4096 and fit["train_minutes"] * 60 == pytest.approx(room, abs=1)
    assert st.render_overlap == fit["render_overlap"] == math.ceil(32 * per_clip / 0.1) == 13
    beside = st.samples * per_clip                                       # steps planned at the slower pace meanwhile
    assert fit["steps"] == pytest.approx(beside / (0.1 * recipe.OVERLAP_SLOWDOWN["bidirectional"]) + (room - beside) / 0.1, abs=1)
    again, _ = recipe.fitted_settings(small, "bidirectional", tmp_path / "short", 3.5, 15, time.perf_counter())
    assert (again.samples, again.steps, again.render_overlap) == (st.samples, st.steps, 13)   # the re-run resumes it
    tiny, _ = recipe.fitted_settings(small, "bidirectional", tmp_path / "tiny", 0.8, 15, time.perf_counter())
    assert 32 <= tiny.samples < 60                                       # ~50: at least a batch
    with pytest.raises(SystemExit, match="leaves"):                     # no time for a batch and training
        recipe.fitted_settings(small, "bidirectional", tmp_path / "none", 0.76, 15, time.perf_counter())
    full, fit = recipe.fitted_settings(small, "bidirectional", tmp_path / "long", 8.5, 15, t)
    assert full.samples == 4096 and "samples" not in fit


def test_the_ground_truth_through_the_codec_is_the_codecs_round_trip():
    """through_codec: a world case encoded and decoded by the shipped codec comes back close (measured: mean
    absolute error 4.06 levels, PSNR 28.5 dB over 33 frames); a codec with its decoder halved does not (118.8)."""
    from models.checkpoint import load_taehv
    from stages.eval.bench.cases import synth_case
    frames = synth_case(0, 256, 33 / 25).frames
    codec = load_taehv(ROOT / "models" / "starter" / "codec.safetensors", "cpu")
    back = recipe.through_codec(codec, frames)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 6
    with torch.no_grad():
        for w in codec.decoder.parameters():
            w.mul_(0.5)
    assert np.abs(recipe.through_codec(codec, frames).astype(int) - frames).mean() > 50

