"""Layer rules: `lint-imports` against the [tool.importlinter] contracts in pyproject.toml.

vidu_cli -> stages -> models -> vidu_kernels | manifests, stage modules above stages.run / sense /
samples, curation stages never import train or stream, no import cycles (lazy imports count).
"""
from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(config: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", str(config)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def contracts_report(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(.+?) (KEPT|BROKEN)$", out, flags=re.M))


def test_project_keeps_every_layer_contract():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(cfg["root_packages"]) == {"vidu_cli", "stages", "models", "vidu_kernels", "manifests"}
    names = [c["name"] for c in cfg["contracts"]]
    assert {c["type"] for c in cfg["contracts"]} == {"layers", "forbidden", "acyclic_siblings"}
    res = lint(ROOT / "pyproject.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert contracts_report(res.stdout) == {n: "KEPT" for n in names}
    assert f"Contracts: {len(names)} kept, 0 broken." in res.stdout


def test_every_stages_module_has_a_layer():
    """A module of stages/ that no layer names would be unconstrained: each must be placed."""
    import stages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (inner,) = [c for c in cfg["contracts"] if c.get("containers") == ["stages"]]
    placed = {m.strip() for layer in inner["layers"] for m in re.split(r"[:|]", layer)}
    assert placed == {m.name for m in pkgutil.iter_modules(stages.__path__)}
    assert {"run", "sense", "samples", "prefilter", "train", "stream"} <= placed


def test_reversed_layers_are_reported_broken(tmp_path):
    # negative control: models above stages must fail, naming a real import of models by stages
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["stages", "models"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "models above stages"\ntype = "layers"\n'
                   'layers = ["models", "stages"]\n')
    res = lint(cfg)
    assert res.returncode == 1, res.stdout + res.stderr
    assert contracts_report(res.stdout) == {"models above stages": "BROKEN"}
    assert re.search(r"stages\.train\.loop -> models\.dit", res.stdout), res.stdout


def test_import_cycle_is_reported_broken(tmp_path):
    # negative control for the acyclic contract: a package whose two modules import each other
    # (one of them lazily, inside a function)
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyc import a\n    return a\n")
    (pkg / "c.py").write_text("from cyc import a\n")
    cfg = tmp_path / "cyc.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["cyc"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "no cycles"\ntype = "acyclic_siblings"\n'
                   'ancestors = ["cyc"]\n')
    res = lint(cfg, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert contracts_report(res.stdout) == {"no cycles": "BROKEN"}
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    res = lint(cfg, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert contracts_report(res.stdout) == {"no cycles": "KEPT"}
