"""TorchX finds schedulers through installed distributions' entry points. The shared dev environment has
kubeforge installed from another checkout, so tests put this tree's declaration (pyproject.toml) in a
dist-info ahead of it on PYTHONPATH: what `pip install kubeforge[torchx]` would install, no more."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def entry_point_env(tmp: Path) -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dist = tmp / f"kubeforge-{project['version']}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kubeforge\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items()) + "\n"
        for group, eps in groups.items()))
    path = [str(tmp), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
