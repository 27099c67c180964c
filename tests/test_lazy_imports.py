"""A layer-only run imports no model or quantization stack (issue #12 item 4).

Importing transformers, PEFT, bitsandbytes, torchao, ... costs seconds of CPU in every process that
does it, and no layer cell of the reference needs them. The check runs in a fresh interpreter, so
what this pytest process has already imported does not hide an import; it asserts which modules got
imported, never how long anything took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from properties.spec import LAYER_KINDS

REPO = Path(__file__).resolve().parent.parent

# Top-level packages that only model cells, quantized kinds or library targets need.
HEAVY = (
    "accelerate",
    "adapters",
    "bitsandbytes",
    "diffusers",
    "hqq",
    "keras",
    "litgpt",
    "loralib",
    "lycoris",
    "peft",
    "torchao",
    "torchtune",
    "transformers",
)

_PROBE = """
import json, sys, tempfile
from properties.cli import main
from properties.session import plan_cells
from properties.targets.registry import load_target

heavy = set(json.loads(sys.argv[1]))
loaded = lambda: sorted({m.split(".")[0] for m in sys.modules} & heavy)
load_target("reference")
plan_cells(layers=sys.argv[2].split(","))
after_plan = loaded()
with tempfile.TemporaryDirectory() as reports:
    status = main(["run", "--target", "reference", "--layers", sys.argv[2], "--dtypes", "float32",
                   "--max-examples", "1", "--jobs", "0", "--report", reports])
print(json.dumps({"status": status, "after_plan": after_plan, "after_run": loaded()}))
"""


def test_a_layer_only_reference_run_imports_no_model_or_quantization_stack():
    # --jobs 0 runs every cell in this one process, so the cells' own imports (what a worker does)
    # show up in sys.modules; every property on every layer kind runs one example.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY), ",".join(LAYER_KINDS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["status"] == 0
    assert seen["after_plan"] == [], f"planning a layer-only run imported {seen['after_plan']}"
    assert seen["after_run"] == [], f"running the layer cells imported {seen['after_run']}"
