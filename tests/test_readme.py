"""README.md's commands run as written: each smoke run (on tiny random checkpoints instead of the embedded
ones, everything else as the README says), and the Quick start's Python snippet."""
import contextlib
import importlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def block_after(marker):
    """The lines of the first fenced code block after `marker` in README.md."""
    return README[README.index(marker):].split("```")[1].split("\n")[1:-1]


SMOKE = [shlex.split(line) for line in block_after("Smoke runs, one per script")]


def test_every_method_script_has_a_smoke_run():
    assert [argv[1] for argv in SMOKE] == ["distill.py", "mblm.py", "continual.py", "align.py", "transfer.py"]
    assert all(argv[0] == "python" and "--no_save" in argv for argv in SMOKE)


@pytest.mark.parametrize("argv", SMOKE, ids=[argv[1] for argv in SMOKE])
def test_smoke_run(argv, tiny_checkpoint, data_dir, tmp_path, device):
    script = argv[1][:-3]
    tiny = str(tiny_checkpoint(mlm_head=script != "continual"))     # continual fits a head where there is none
    models = {"distill": ["--teacher", tiny, "--student", tiny],
              "mblm": ["--teachers", f"eng_Latn={tiny},deu_Latn={tiny}", "--student", tiny],
              "continual": ["--model", tiny, "--freeze_layers", "1"], "align": ["--model", tiny],
              "transfer": ["--model", tiny, "--reference", tiny]}[script]
    out = tmp_path / "out"
    result = importlib.import_module(script).main(argv[2:] + models + ["--data_dir", str(data_dir), "--out_dir",
                                                                       str(out), "--device", device])
    saved = json.loads((out / "results.json").read_text())
    assert saved["script"] == argv[1] and saved["results"] and result["mean"] == saved["mean"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results.json", "results.md", "units"]   # no model


def test_quick_start_snippet_runs_as_written():
    code = README[README.index("## Quick start"):].split("```python")[1].split("```")[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert re.fullmatch(r"\(2, (\d+)\) \(2, \1, 384\) 7\n", printed.getvalue())


def test_ci_runs_exactly_the_readme_test_command():
    readme = block_after("<!-- test command -->")
    ci = (REPO / ".ci" / "run").read_text().split("# --- README test command ---\n")[1].strip().split("\n")
    assert ci == readme and readme[-1].endswith("python -m pytest -q tests")
