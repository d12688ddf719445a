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


# Every flag has a type that encodes its valid range: out of range is an argparse error (exit 2, naming the
# flag) before any work, never a crash inside torch after earlier stages, nor a silent default.
COMMON_BAD = [("--lr", "-1e-4"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--max_len", "-5"),
              ("--max_len", "0"), ("--langs", ""), ("--langs", "deu_Latn,,fra_Latn"), ("--out_dir", ""),
              ("--data_dir", ""), ("--device", "gpu"), ("--device", "mps"), ("--weight_decay", "-1"),
              ("--dropout", "1"), ("--epochs", "0"), ("--limit", "0"), ("--langs", "eng_Latn,deu_Latn,eng_Latn")]
OWN_BAD = {"distill": [("--temperature", "0"), ("--alpha", "nan"), ("--student", "")],
           "mblm": [("--classifier_lr", "-1"), ("--classifier_lr", "0"), ("--teachers", ""), ("--zs_weight", "-inf")],
           "continual": [("--mlm_head_lr", "-1"), ("--memory_langs", ""), ("--mlm_prob", "0"), ("--model", "")],
           "align": [("--align_lr", "-3e-5"), ("--mask_prob", "0"), ("--align_langs", ""), ("--parallel", "")],
           "transfer": [("--stage_a_lr", "-1"), ("--stage_b_lr", "0"), ("--mlm_head_lr", "nan"), ("--mono", "")],
           "bench": [("--batch_size", "0"), ("--seq_len", "0"), ("--repeats", "0"), ("--seed", "-1"), ("--json", "")],
           "evaluate": [("--max_len", "0"), ("--langs", ""), ("--device", "gpu"), ("--eval_limit", "0")]}
BAD = [(name, flag, value) for name in METHODS for flag, value in COMMON_BAD] + [
    (name, flag, value) for name, cases in OWN_BAD.items() for flag, value in cases]


@pytest.mark.parametrize("name, flag, value", BAD)
def test_flags_out_of_range_are_argparse_errors(name, flag, value, capsys):
    script = importlib.import_module(name)
    required = ["--model", "m", "--task", "sib200"] if name == "evaluate" else []
    with pytest.raises(SystemExit) as e:
        script.main(required + [f"{flag}={value}"])        # = : argparse reads "-1e-4" alone as a flag
    assert e.value.code == 2
    assert f"error: argument {flag}: {value!r} is not a" in capsys.readouterr().err


def test_max_len_beyond_the_position_table_is_one_line_right_after_loading(tiny_checkpoint, data_dir, tmp_path):
    import distill
    import evaluate
    from model import XltError
    ckpt = str(tiny_checkpoint())                              # BERT, 256 positions
    with pytest.raises(XltError, match=f"^--max_len 300: {ckpt} has 256 positions, so at most 256$"):
        evaluate.main(["--model", ckpt, "--task", "tatoeba", "--max_len", "300", "--data_dir", str(data_dir)])
    with pytest.raises(XltError, match=f"^--max_len 257: {ckpt} has 256 positions"):
        distill.main(["--teacher", ckpt, "--student", ckpt, "--max_len", "257", "--limit", "8",
                      "--data_dir", str(data_dir), "--no_save", "--out_dir", str(tmp_path / "out")])

    class Stub:                                                # RoBERTa: real tokens from pad + 1 = 2 on
        config = __import__("model").Config(model_type="xlm-roberta", max_position_embeddings=514, pad_token_id=1)
    evaluate.check_max_len(512, Stub, "e5")
    with pytest.raises(XltError, match="^--max_len 513: e5 has 514 positions, so at most 512$"):
        evaluate.check_max_len(513, Stub, "e5")


def test_cuda_index_beyond_the_gpus_is_one_line(monkeypatch):
    import torch
    from model import XltError, pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(XltError, match=r"^--device cuda:1: this machine has 1 GPU \(cuda:0..cuda:0\)$"):
        pick_device("cuda:1")
