"""Every script's --help: exits 0, documents every option, and shows each default once."""
import argparse
import importlib
import re

import pytest

from model import HelpFormatter

SCRIPTS = ["distill", "mblm", "continual", "align", "transfer", "evaluate", "bench"]


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
