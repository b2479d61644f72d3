"""The runtime never imports torch or transformers: in a fresh interpreter, load an exported
tiny model, answer a question through the API and through llava-run's code, and look at
sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("torch", "transformers")
REPO = Path(__file__).resolve().parents[1]  # run this checkout's runtime

SCRIPT = """
import json, sys
import runtime.backends.ort
import runtime.cli
import runtime.pipeline

artifacts, image = sys.argv[1], sys.argv[2]
pipe = runtime.pipeline.Pipeline.load(artifacts)
answer = pipe.generate("What is shown in the image?", images=[image], max_new_tokens=4)
pieces = list(pipe.stream("What is shown in the image?", images=[image], max_new_tokens=4))
# llava-run's own code path, in this process (standalone_mode=False: no sys.exit)
runtime.cli.main.main(
    ["--artifacts", artifacts, "--image", image, "--prompt", "Hi", "--max-new-tokens", "2", "--json"],
    standalone_mode=False,
)
heavy = sorted(name for name in sys.modules if name.split(".")[0] in {forbidden!r})
print(json.dumps({{"tokens": answer.token_ids, "pieces": len(pieces), "heavy": heavy}}))
"""


def run_fresh(*args: str) -> dict:
    script = SCRIPT.format(forbidden=set(FORBIDDEN))
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_runtime_runs_without_torch_or_transformers(tiny_artifacts, images):
    report = run_fresh(str(tiny_artifacts), str(images["a"]))
    assert report["tokens"], "the model answered nothing"
    assert report["heavy"] == [], f"the runtime imported {report['heavy'][:5]}"


def test_the_check_sees_an_import(tiny_artifacts, images, monkeypatch, tmp_path):
    """The detector itself works: a module named transformers, planted at startup, is reported."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys, types\nsys.modules['transformers'] = types.ModuleType('transformers')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    report = run_fresh(str(tiny_artifacts), str(images["a"]))
    assert "transformers" in report["heavy"]
