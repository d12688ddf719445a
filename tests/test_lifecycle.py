"""The output folder's lifecycle (issue 14): a diverged run publishes nothing, one run per folder, leftovers
of a killed save are cleaned, a killed or interrupted run resumes to the uninterrupted run's numbers, and
every JSON file is strict. Tiny random checkpoints, a few training rows."""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distill
import evaluate

REPO = Path(__file__).resolve().parents[1]

# Runs `script` with its argv in a fresh process whose Nth call of module.function (a writer) first sends the
# process `signal` (SIGKILL: a crash in the middle of a save; SIGINT: Ctrl-C).
# A shell that starts the suite in the background (`cmd &`) leaves SIGINT ignored in every child: restore Python's
# own handler, so that the child sees Ctrl-C as a terminal would deliver it.
WRAPPER = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
import {module}
calls, real = [0], {module}.{function}
def write(*args):
    calls[0] += 1
    if calls[0] == {at}:
        os.kill(os.getpid(), signal.{signal})
    return real(*args)
{module}.{function} = write
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def run_with_signal(script, argv, at, signal, writer="model.write_safetensors"):
    module, function = writer.split(".")
    code = WRAPPER.format(repo=str(REPO), module=module, function=function, at=at, signal=signal,
                          script=str(REPO / script), argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture
def distill_argv(tiny_checkpoint, data_dir, tmp_path):
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)

    def argv(out, *more):
        return ["--teacher", str(teacher), "--student", str(student), "--data_dir", str(data_dir), "--out_dir",
                str(out), "--langs", "eng_Latn,deu_Latn", "--limit", "16", "--eval_limit", "8", "--epochs", "1",
                "--batch_size", "8", "--dropout", "0", "--device", "cpu", *more]
    return argv


def cli_error(main, argv):
    """What evaluate.cli makes of main(argv): (exit status, the message)."""
    with pytest.raises(SystemExit) as e:
        evaluate.cli(lambda: main(argv))
    return (1 if isinstance(e.value.code, str) else e.value.code), str(e.value.code)


@pytest.mark.parametrize("flags, says", [
    (["--log_every", "1"], "teacher: the loss is nan by step 2/2, peak lr 1e+30;"),
    # One step at a huge lr: its loss (measured before the update) is finite, the weights after it are too, but the
    # outputs overflow. Scoring them would give argmax(NaN) = class 0 as a result; the run stops instead.
    (["--limit", "8"], "outputs are NaN or infinite")], ids=["loss", "outputs after the last step"])
def test_a_diverged_run_stops_with_one_line_and_publishes_nothing(distill_argv, tmp_path, flags, says):
    out = tmp_path / "out"
    status, msg = cli_error(distill.main, distill_argv(out, "--lr", "1e30", *flags))
    assert status == 1 and "\n" not in msg
    assert msg.startswith("error: ") and says in msg
    assert not (out / "results.json").exists() and not (out / "teacher").exists()
    assert not list((out / "units").glob("seed*"))


def test_a_damaged_record_in_the_run_folder_is_one_line(distill_argv, tmp_path):
    out = tmp_path / "out"
    (out / "units").mkdir(parents=True)
    (out / "units" / "run.json").write_text("[")                   # damaged outside xlt: records are atomic
    status, msg = cli_error(distill.main, distill_argv(out, "--no_save"))
    assert status == 1 and msg == f"error: {out / 'units' / 'run.json'}: not valid JSON (Expecting value: line 1 " \
                                  "column 2 (char 1))"


def test_a_second_run_on_a_folder_in_use_is_refused(distill_argv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:                # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        status, msg = cli_error(distill.main, distill_argv(out))
    assert status == 1 and msg == f"error: --out_dir {out} is in use by another run (pid 4242); wait for it, " \
                                  "or give this run another --out_dir"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_out_dir_problems_are_one_line_before_training(distill_argv, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, why in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "Not a directory")]:
        status, msg = cli_error(distill.main, distill_argv(out))
        assert status == 1 and msg.startswith(f"error: --out_dir {out}") and why in msg and "\n" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_one_line(distill_argv, tmp_path):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    status, msg = cli_error(distill.main, distill_argv(out / "x"))
    assert status == 1 and "cannot write there" in msg


def test_leftovers_of_a_killed_save_are_cleaned_and_another_command_is_refused(distill_argv, tmp_path):
    out = tmp_path / "out"
    for name in (".teacher.old", ".teacher.k2j4_x9a", "sub/.model.safetensors.abcd1234.tmp"):
        (out / name).mkdir(parents=True) if "tmp" not in name else None
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}") if path.is_dir() else path.write_text("half")
    keep = out / ".keep_me"
    keep.write_text("not ours")
    distill.main(distill_argv(out, "--no_save", "--seeds", "3"))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [".keep_me", ".lock", "results.json", "results.md", "sub", "units"] + [
        f"units/{f}" for f in ["run.json", "seed3-baseline.json", "seed3-output_distill.json",
                               "seed3-repr_distill.json", "seed3-teacher.json", "seed3-teacher.safetensors"]]
    for path in out.rglob("*.json"):
        strict_json(path)
    status, msg = cli_error(distill.main, distill_argv(out, "--no_save", "--seeds", "3", "--lr", "1e-3"))
    assert msg == (f"error: --out_dir {out} holds units of another command (--lr 0.0001 there, 0.001 here): use "
                   "another --out_dir, or add --restart to discard them")
    res = distill.main(distill_argv(out, "--no_save", "--seeds", "3", "--lr", "1e-3", "--restart"))
    assert res["config"]["lr"] == 1e-3 and res["units"]["pending"] == []


def test_distill_killed_in_a_save_resumes_to_the_uninterrupted_numbers(distill_argv, tmp_path):
    clean = distill.main(distill_argv(tmp_path / "clean", "--seeds", "1", "2"))
    out = tmp_path / "out"
    argv = distill_argv(out, "--seeds", "1", "2")
    # write_safetensors calls: teacher head, teacher model, the teacher's targets, baseline head -> killed
    r = run_with_signal("distill.py", argv, at=4, signal="SIGKILL")
    assert r.returncode == -9
    partial = strict_json(out / "results.json")
    assert partial["units"]["done"] == ["seed1-teacher"] and partial["seeds"] == [1]
    assert partial["results"]["1"]["teacher"] == clean["results"]["1"]["teacher"]
    assert [p.name for p in out.glob(".baseline.*")]                       # the killed save's temp folder
    r = run_with_signal("distill.py", argv, at=0, signal="SIGKILL")        # the same command, not killed
    assert r.returncode == 0, r.stderr
    assert "[distill.py] seed1-teacher: finished in an earlier run, skipped" in r.stdout
    assert "seed 1 baseline" in r.stdout and not list(out.glob(".baseline.*"))
    final = strict_json(out / "results.json")
    assert final["results"] == json.loads(json.dumps(clean["results"])) and final["units"]["pending"] == []
    # the CIs come from the outcomes kept in the unit records: a resumed run has the same
    assert final["comparisons"] == json.loads(json.dumps(clean["comparisons"])) and len(final["comparisons"]) == 5
    for path in out.rglob("*.json"):
        strict_json(path)


def test_ctrl_c_keeps_the_finished_units_and_says_how_to_resume(distill_argv, tmp_path):
    out = tmp_path / "out"
    r = run_with_signal("distill.py", distill_argv(out), at=4, signal="SIGINT")   # in the baseline's save
    assert r.returncode == 130
    assert r.stderr.strip().splitlines()[-1] == (f"interrupted: 1 finished unit kept in {out}; "
                                                 "the same command resumes")
    assert strict_json(out / "results.json")["units"]["done"] == ["seed1-teacher"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results.json", "results.md", "teacher", "units"]


# Per script: tiny flags, the Nth call of a writer that is killed, and the unit the rerun must skip.
# continual: save calls 1-2 are naive's model (killed in it; 'before' is done); mblm: write_json calls are
# run.json, then per unit its record and results.json, the 8th the mblm variant's mblm.json (vanilla after it,
# for the comparisons); align: 1 is aligned/, 2-3 the unaligned classifier; transfer: write_json 4 is the random
# init's record.
def resume_cases(ckpt, data_dir):
    small = ["--data_dir", str(data_dir), "--epochs", "1", "--batch_size", "8", "--dropout", "0", "--device", "cpu",
             "--seeds", "0"]
    m2, m3 = ckpt("m2", layers=2, seed=1), ckpt("m3", layers=3, seed=0)
    return {
        "continual": (["--model", str(m2), "--method", "naive", "--langs", "deu_Latn", "--limit", "16",
                       "--eval_limit", "8", "--memory_langs", "eng_Latn", "--memory_per_lang", "4",
                       "--memory_eval_per_lang", "2", "--max_len", "32"], "model.write_safetensors", 2, "seed0-before"),
        "mblm": (["--student", str(m3), "--teachers", f"eng_Latn={m2},fra_Latn={m2}", "--langs",
                  "eng_Latn,fra_Latn,deu_Latn", "--variants", "multi_teacher", "mblm", "vanilla", "--limit", "12",
                  "--eval_limit", "8", "--teacher_epochs", "1", "--branch_layers", "1", "--train_layers", "2"],
                 "evaluate.write_json", 8, "seed0-multi_teacher"),
        "align": (["--model", str(m2), "--align_langs", "deu_Latn", "--align_steps", "2", "--align_batch_size", "4",
                   "--queue_size", "8", "--langs", "eng_Latn,deu_Latn", "--limit", "16", "--eval_limit", "8",
                   "--max_len", "32"], "model.write_safetensors", 3, "seed0-align"),
        "transfer": (["--model", str(m2), "--reference", str(m2), "--langs", "fra_Latn", "--vocab_size", "200",
                      "--stage_a_steps", "1", "--stage_b_steps", "1", "--limit", "40", "--eval_limit", "8"],
                     "evaluate.write_json", 4, "fra_Latn-seed0-ramen"),
    }, small


@pytest.mark.parametrize("script", ["continual", "mblm", "align", "transfer"])
def test_killed_runs_resume_to_the_uninterrupted_numbers(script, tiny_checkpoint, data_dir, tmp_path):
    cases, small = resume_cases(tiny_checkpoint, data_dir)
    argv, writer, at, skipped = cases[script]
    main = __import__(script).main
    clean = main(argv + small + ["--out_dir", str(tmp_path / "clean")])
    argv = argv + small + ["--out_dir", str(tmp_path / "out")]
    for kept in (tmp_path / "clean" / "units").glob("*.tokenizer"):   # transfer's vocabulary varies per process:
        (tmp_path / "out" / "units").mkdir(parents=True, exist_ok=True)   # the clean run's, with its fingerprint
        (tmp_path / "out" / "units" / "run.json").write_bytes((kept.parent / "run.json").read_bytes())
        (tmp_path / "out" / "units" / kept.name).write_bytes(kept.read_bytes())
    r = run_with_signal(f"{script}.py", argv, at, "SIGKILL", writer)
    assert r.returncode == -9, r.stderr
    assert skipped in strict_json(tmp_path / "out" / "results.json")["units"]["done"]
    r = run_with_signal(f"{script}.py", argv, 0, "SIGKILL", writer)
    assert r.returncode == 0, r.stderr
    assert f"[{script}.py] {skipped}: finished in an earlier run, skipped" in r.stdout
    final = strict_json(tmp_path / "out" / "results.json")
    assert final["results"] == json.loads(json.dumps(clean["results"])) and final["units"]["pending"] == []
    assert final["comparisons"] == json.loads(json.dumps(clean["comparisons"])) and final["comparisons"]
    for path in (tmp_path / "out").rglob("*.json"):
        strict_json(path)
