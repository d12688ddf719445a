"""Every script's --help: exits 0, documents every option, shows each default once, and the five method
scripts speak one flag vocabulary."""
import argparse
import importlib
import re

import pytest

from evaluate import HelpFormatter

SCRIPTS = ["distill", "mblm", "continual", "align", "transfer", "evaluate", "bench"]
METHODS = SCRIPTS[:5]
COMMON = ["--langs", "--data_dir", "--out_dir", "--device", "--seeds", "--compile", "--epochs", "--batch_size",
          "--lr", "--weight_decay", "--warmup", "--max_len", "--dropout", "--prefix", "--train_embeddings",
          "--limit", "--eval_limit", "--log_every", "--no_save"]


def test_help_formatter_shows_defaults_once():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=5)                                   # no help text at all
    p.add_argument("--seed", type=int, default=0, help="the seed")                  # a falsy default is still shown
    p.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1, ours)")
    p.add_argument("--data_dir", default=None, help="data folder")
    p.add_argument("--compile", action="store_true", help="torch.compile")
    text = " ".join(p.format_help().split())
    assert "--steps STEPS (default: 5)" in text
    assert "--seed SEED the seed (default: 0)" in text
    assert text.count("default") == 3          # steps, seed, and lr's own words: never added twice
    assert "data folder --compile torch.compile -h" not in text and "(default: None)" not in text
    assert "(default: False)" not in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name, capsys):
    script = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "(default: " in out
    lines = out[out.index("options:"):].splitlines()[1:]
    for i, line in enumerate(lines):
        # an option with help has its text on its own line (after 2+ spaces) or on the next, indented line
        if re.match(r"^  -", line) and not re.search(r"\S  +\S", line.strip()):
            assert i + 1 < len(lines) and lines[i + 1].startswith(" " * 10), f"{name}: {line.strip()} has no help"


@pytest.mark.parametrize("name", METHODS)
def test_method_scripts_share_one_vocabulary(name, capsys):
    script = importlib.import_module(name)
    with pytest.raises(SystemExit):
        script.main(["--help"])
    flags = set(re.findall(r"^  (--[a-z_]+)", capsys.readouterr().out, re.M))
    assert not [f for f in COMMON if f not in flags], f"{name} lacks common flags"
    # one name, one meaning: the old dialects are gone
    assert not flags & {"--seed", "--train_limit", "--max_train", "--train_sentences", "--tatoeba_n", "--max_sentences",
                        "--eval_batch_size", "--head_lr", "--eval_langs", "--tatoeba_langs", "--checkpoint", "--lang"}


def test_every_runnable_file_answers_help():
    """data.py's download command answers --help; model.py is a library with no __main__ block."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "data.py", "download", "--help"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0 and "--data_dir" in r.stdout and "--only" in r.stdout
    assert "__main__" not in (repo / "model.py").read_text()
