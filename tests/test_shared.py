"""The machinery the five scripts share: training utilities (model.py), subsets, language codes and
masked-LM batches (data.py), the fine-tune protocol, per-layer tables, results schema and flags (evaluate.py)."""
import argparse
import errno
import json
import time

import pytest
import torch
import torch.nn as nn

import data
import evaluate as ev
import model


# -------------------- model.py: training utilities --------------------------------------------------

def test_lr_schedule_and_set_lr_scale_every_group_from_its_peak():
    assert [model.lr_schedule(s, 10, 2) for s in range(10)] == [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8,
                                                                 3 / 8, 2 / 8, 1 / 8]
    lin, head = nn.Linear(3, 2), nn.Linear(2, 1)
    opt = model.configure_optimizer([lin], 1e-3, 0.01)
    for g in model.configure_optimizer([head], 1e-2, 0.01).param_groups:
        opt.add_param_group(g)
    assert model.set_lr(opt, 0.5) == pytest.approx(5e-4)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-4, 5e-4, 5e-3, 5e-3])
    # weight decay on matrices only
    assert {g["weight_decay"] for g in opt.param_groups if any(p.ndim >= 2 for p in g["params"])} == {0.01}
    assert {g["weight_decay"] for g in opt.param_groups if all(p.ndim < 2 for p in g["params"])} == {0.0}


def test_optimizer_step_clips_steps_and_clears():
    lin = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(lin.weight)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    opt.param_groups[0]["peak_lr"] = 1.0
    (100 * lin(torch.ones(1, 4))).sum().backward()          # gradient (100, 100, 100, 100): norm 200
    model.optimizer_step(opt, clip=1.0)
    assert lin.weight.grad is None
    assert torch.allclose(lin.weight, torch.full((1, 4), -0.5))  # clipped to norm 1: each entry 1/2


def test_loss_log_syncs_every_n_steps_and_at_the_end():
    log = model.LossLog(every=2, total=5)
    out = [log.add(torch.tensor(float(i)), torch.tensor(10.0 * i)) for i in range(5)]
    assert out[0] is None and out[2] is None
    assert out[1] == pytest.approx([0.5, 5.0]) and out[3] == pytest.approx([2.5, 25.0])
    assert out[4] == pytest.approx([4.0, 40.0])              # the last step closes a window of one


def test_loss_log_stops_on_a_non_finite_window():
    opt = model.configure_optimizer([torch.nn.Linear(2, 2)], 1e5, 0.0)
    log = model.LossLog(every=3, total=10, what="teacher", opt=opt)
    assert log.add(torch.tensor(1.0)) is None and log.add(torch.tensor(float("nan"))) is None   # no sync yet
    with pytest.raises(model.XltError, match=r"teacher: the loss is nan by step 3/10, peak lr 100000;"):
        log.add(torch.tensor(1.0))
    log = model.LossLog(every=3, total=10, what="stage A")
    log.add(torch.tensor(float("inf")))
    with pytest.raises(model.XltError, match="stage A: the loss is inf by step 1/10"):   # a window left open
        log.finish()
    assert log.finish() is None
    log = model.LossLog(every=10, total=20, what="baseline")   # an evaluation before the window closes
    log.add(torch.tensor(1.0))
    log.check()                                                # finite so far: nothing happens, the window stays
    log.add(torch.tensor(float("nan")))
    with pytest.raises(model.XltError, match="baseline: the loss is nan by step 2/20"):
        log.check()


def test_trainable_state_restores_only_trainable_tensors():
    lin = nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    state = model.trainable_state(lin)
    assert len(state) == 1
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    model.restore(state)
    assert torch.equal(lin.weight, before)


def test_evaluating_restores_each_submodule_mode():
    net = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    net[1].eval()
    with model.evaluating(net, None):
        assert not net.training and not net[0].training and not torch.is_grad_enabled()
    assert net.training and net[0].training and not net[1].training and torch.is_grad_enabled()


def test_dropout_override_at_load(tiny_checkpoint):
    path = tiny_checkpoint()
    enc = model.Encoder.from_pretrained(path, dropout=0.0)
    assert enc.config.hidden_dropout_prob == enc.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in enc.modules() if isinstance(m, nn.Dropout))
    assert all(b.attn_dropout == 0.0 for b in enc.layers)
    assert model.Encoder.from_pretrained(path).config.hidden_dropout_prob == 0.1


# -------------------- data.py: subsets, language codes, masked-LM batches ---------------------------

def test_subset_is_evenly_spaced_and_keeps_order():
    assert data.subset(range(10), 3) == [0, 3, 6]
    assert data.subset(range(10), 5) == [0, 2, 4, 6, 8]
    assert data.subset(range(4), None) == data.subset(range(4), 9) == [0, 1, 2, 3]
    labels = [0] * 50 + [1] * 50                             # sorted by label, like SIB-200's files
    assert sorted(set(data.subset(labels, 10))) == [0, 1]


def test_language_codes():
    assert data.tatoeba_code("zho_Hans") == "cmn" and data.pud_code("zho_Hans") == "zh"
    assert data.tatoeba_code("arb_Arab") == "ara" and data.pud_code("arb_Arab") == "ar"
    assert data.tatoeba_code("deu_Latn") == "deu" and data.tatoeba_code("xyz_Latn") == "xyz"
    assert data.pud_code("swh_Latn") is None and data.pud_code("xyz_Latn") is None


def test_mlm_batch_positions_targets_rows_and_positions_ids():
    sp = {"cls": 1, "sep": 2, "pad": 0, "mask": 3, "unk": 4}
    examples = [{"input_ids": [1] + list(range(10, 40)) + [2], "token_type_ids": [0] * 32},
                {"input_ids": [1, 11, 2], "token_type_ids": [0] * 3}]
    g = torch.Generator().manual_seed(0)
    b = data.mlm_batch(examples, sp, 50, g, prob=0.5, position_offset=2)
    flat = torch.tensor([examples[0]["input_ids"], examples[1]["input_ids"] + [0] * 29]).view(-1)
    assert torch.equal(b["targets"], flat[b["positions"]])   # targets are the original ids
    assert not torch.isin(b["targets"], torch.tensor([0, 1, 2])).any()
    assert b["position_ids"][0, :4].tolist() == [2, 3, 4, 5] and b["position_ids"][1, 3:].eq(0).all()
    rows = torch.full((50,), -1)
    rows[10:40] = torch.arange(30)
    b2 = data.mlm_batch(examples, sp, 50, torch.Generator().manual_seed(0), prob=0.5, rows=rows)
    assert torch.equal(b2["targets"], b["targets"] - 10)
    # nothing drawn: the first real token is masked, so the loss is never an empty mean
    b3 = data.mlm_batch(examples[1:], sp, 50, torch.Generator().manual_seed(0), prob=0.0)
    assert b3["positions"].tolist() == [1] and b3["targets"].tolist() == [11] and b3["input_ids"][0, 1] == 3
    with pytest.raises(model.XltError, match="outside the restricted MLM vocabulary"):
        data.mlm_batch(examples[1:], sp, 50, torch.Generator(), prob=0.0, rows=torch.full((50,), -1))


def test_mlm_loss_and_head_fit(tiny_checkpoint):
    enc = model.Encoder.from_pretrained(tiny_checkpoint(mlm_head=False), mlm_head=True, dropout=0.0)
    tok = data.load_tokenizer(tiny_checkpoint(name="t2"))
    sp = data.special_ids(tok)
    ex = data.encode(tok, ["the house of the new one", "a new house", "le la les de des"] * 8, 16)
    g = torch.Generator().manual_seed(0)
    batches = [data.mlm_batch(ex[i:i + 8], sp, enc.config.vocab_size, g) for i in range(0, 24, 8)]
    loss, correct = model.mlm_loss(enc, batches[0])
    h = enc(batches[0]["input_ids"], batches[0]["attention_mask"])
    ref = nn.functional.cross_entropy(enc.mlm_logits(h.flatten(0, 1)[batches[0]["positions"]]), batches[0]["targets"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and 0 <= correct <= len(batches[0]["targets"])
    encoder_before = [p.detach().clone() for p in enc.layers.parameters()]
    info = model.fit_mlm_head(enc, batches, 60, 1e-2, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert info["steps"] == 60 and info["targets"] == sum(len(b["targets"]) for b in batches)
    after, _ = model.mlm_loss(enc, batches[0])
    assert after.item() < loss.item()                          # the head learned
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, enc.layers.parameters()))   # encoder frozen
    assert not any(p.requires_grad for p in enc.parameters())


# -------------------- evaluate.py: protocol, tables, results, flags ---------------------------------

def test_finetune_keeps_the_best_dev_epoch(tiny_checkpoint, data_dir):
    enc = model.Encoder.from_pretrained(tiny_checkpoint(), dropout=0.0)
    tok = data.load_tokenizer(tiny_checkpoint(name="t2"))
    rows = data.subset(data.read_sib200(data_dir, "eng_Latn", "train"), 24)
    dev = data.subset(data.read_sib200(data_dir, "eng_Latn", "dev"), 12)
    args = argparse.Namespace(lr=1e-3, weight_decay=0.0, epochs=3, batch_size=8, warmup=0.1, max_len=32, log_every=1)
    seen = []
    head, log = ev.finetune(enc, tok, rows, dev, args, torch.device("cpu"), seed=1,
                            epoch_rows=lambda e: seen.append(e) or rows)
    assert seen == [0, 1, 2] and len(log["dev_curve"]) == 3 and len(log["loss"]) == 9
    assert log["dev"] == max(log["dev_curve"]) and log["dev_curve"][log["best_epoch"] - 1] == log["dev"]
    again = ev.classification_scores(enc, head, tok, {"dev": dev}, "cpu", 32)["dev"]
    assert round(again, 2) == log["dev"]                     # the best epoch's weights are the ones left


def test_per_layer_table_means_over_languages():
    table = ev.per_layer_table({"before": {"a": [10.0, 20.0], "b": [30.0, 40.0]}, "after": {"a": [0.0, 50.0], "b": [0.0, 70.0]}})
    lines = table.splitlines()
    assert lines[0] == "| hidden state | before | after |"
    assert lines[2] == "| emb | 20.0 | 0.0 |" and lines[3] == "| layer 1 | 30.0 | 60.0 |"


def test_mean_std_and_table_with_spread():
    per_seed = {1: {"m": {"x": 80.0, "y": None}}, 2: {"m": {"x": 84.0, "y": 50.0}}}
    mean, std = ev.mean_std(per_seed)
    assert mean == {"m": {"x": 82.0, "y": 50.0}} and std["m"]["x"] == pytest.approx(2 ** 1.5) and std["m"]["y"] is None
    row = ev.with_averages({"eng": 90.0, "deu": 80.0, "fra": 70.0}, "eng")
    assert row["avg"] == 80.0 and row["zero-shot avg"] == 75.0
    table = ev.markdown_table({"m": row}, std={"m": {"deu": 1.25}}, train_lang="eng")
    assert table.splitlines()[0] == "| method | eng | deu | fra | avg | zero-shot avg |"   # no second avg
    assert table.splitlines()[2] == "| m | 90.0 | 80.0 ± 1.2 | 70.0 | 80.0 | 75.0 |"


def test_write_results_schema(tmp_path):
    p = ev.add_common_args(ev.parser("x.py: a test.\n\nmore"), "out/x", 1, 8, 1e-3, "languages")
    args = ev.parse(p, ["--out_dir", str(tmp_path / "o"), "--seeds", "1", "2"])
    per_seed = {1: {"m": {"deu": 1.0}}, 2: {"m": {"deu": 3.0}}}
    ev.write_results(args, "x.py", "A. Author (2020)", per_seed, ["| t |"], {"log": [1]}, torch.device("cpu"), time.time())
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(res) == ["script", "paper", "command", "config", "seeds", "results", "mean", "std", "comparisons",
                         "units", "hardware", "seconds", "details"]
    assert res["comparisons"] == []
    assert res["command"] == f"python x.py --out_dir {tmp_path / 'o'} --seeds 1 2" and "argv" not in res["config"]
    assert res["seeds"] == [1, 2] and res["results"]["2"] == {"m": {"deu": 3.0}} and res["mean"] == {"m": {"deu": 2.0}}
    assert (tmp_path / "o" / "results.md").read_text() == "| t |\n"
    rows = ev.compare({"m": {1: {"deu": "10"}}, "b": {1: {"deu": "00"}}}, [("m", "b", "deu", ["deu"])])
    ev.write_results(args, "x.py", "A. Author (2020)", per_seed, ["| t |"], {}, torch.device("cpu"), time.time(),
                     comparisons=rows)
    assert json.loads((tmp_path / "o" / "results.json").read_text())["comparisons"] == rows
    assert (tmp_path / "o" / "results.md").read_text() == "| t |\n\n" + ev.comparison_table(rows) + "\n"
    with pytest.raises(ValueError):                       # strict JSON: a NaN reaching a writer is a bug
        ev.write_json(tmp_path / "o" / "results.json", {"m": float("nan")})
    assert json.loads((tmp_path / "o" / "results.json").read_text())["seeds"] == [1, 2]    # the file is intact


def test_mean_std_of_a_partial_run_leaves_out_missing_methods():
    mean, std = ev.mean_std({1: {"a": {"x": 1.0}, "b": {"x": 5.0}}, 2: {"a": {"x": 3.0}}})
    assert mean == {"a": {"x": 2.0}, "b": {"x": 5.0}} and std["b"] == {"x": None}


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch_size", "-1"), ("--lr", "-1e-3"),
                                         ("--warmup", "1"), ("--dropout", "1.5"), ("--device", "gpu"),
                                         ("--limit", "0"), ("--max_len", "x"), ("--seeds", "1 1"), ("--seeds", "-1")])
def test_common_flags_are_checked_by_argparse(flag, value, capsys):
    p = ev.add_common_args(ev.parser("x.py: a test."), "out/x", 1, 8, 1e-3, "languages")
    with pytest.raises(SystemExit) as e:
        ev.parse(p, [flag, *value.split()])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_cli_makes_os_errors_on_named_files_one_line_and_keeps_others(monkeypatch):
    monkeypatch.setattr(ev.RunFolder, "active", None)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "out/results.json")
    with pytest.raises(SystemExit, match=r"^error: cannot write out/results.json \(No space left on device\); "
                                         r"nothing was written$"):
        ev.cli(full)

    def replace_onto_a_folder():                    # os.replace(tmp, path): the destination is the culprit
        raise IsADirectoryError(errno.EISDIR, "Is a directory", ".r.json.x1.tmp", None, "out/r.json")
    with pytest.raises(SystemExit, match=r"^error: out/r.json: Is a directory; nothing was written$"):
        ev.cli(replace_onto_a_folder)

    def unnamed():
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):                    # names no file: a bug keeps its traceback
        ev.cli(unnamed)


def test_save_pretrained_over_a_stale_old_folder(tiny_checkpoint, tmp_path):
    enc = model.Encoder.from_pretrained(tiny_checkpoint(), verbose=False)
    model.save_pretrained(enc, tmp_path / "x")
    (tmp_path / ".x.old").mkdir()                  # left by a save killed between its two renames
    (tmp_path / ".x.old" / "config.json").write_text("{}")
    model.save_pretrained(enc, tmp_path / "x")     # a save over x moves x to .x.old first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".x") or p.name == "x") == ["x"]
    assert model.Encoder.from_pretrained(tmp_path / "x", verbose=False).config == enc.config
