"""Tests of evaluate.py: metrics against hand computation, retrieval, tables, atomic JSON, pooling,
prediction order, and the command line on tiny checkpoints with real SIB-200 / Tatoeba rows."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import data
import evaluate as ev
import model

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- metrics

def test_accuracy_and_macro_f1_by_hand():
    labels = [0, 0, 1, 1, 2, 3]
    preds = [0, 1, 1, 1, 2, 2]   # class 3 is never predicted; class 4 occurs nowhere
    assert ev.accuracy(preds, labels) == pytest.approx(100 * 4 / 6)
    # F1 = 2TP / (2TP + FP + FN): class 0: 2/3, class 1: 4/5, class 2: 2/3, class 3: 0, class 4 skipped
    assert ev.macro_f1(preds, labels, num_labels=5) == pytest.approx(100 * (2 / 3 + 4 / 5 + 2 / 3 + 0) / 4)
    assert ev.macro_f1(labels, labels, num_labels=5) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        ev.accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        ev.macro_f1([0], [0, 1], 2)


# ---------------------------------------------------------------------------------------------- retrieval

def test_retrieval_top1_cosine_both_directions():
    src = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 0.2]])
    # tgt[2] is long: with a dot product src[0] would retrieve it, with cosine src[0] retrieves tgt[0]
    tgt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 6.0]])
    # src[2] = (1, .2) is closer to tgt[0] (cos .98) than to its translation tgt[2] (cos .94): wrong;
    # every tgt row's nearest src row is its own translation (tgt[2] -> src[2], cos .94 > .86)
    s2t, t2s = ev.retrieval_top1(src, tgt)
    assert s2t == pytest.approx(100 * 2 / 3)
    assert t2s == pytest.approx(100.0)
    assert ev.retrieval_top1(tgt, src) == pytest.approx((100.0, 100 * 2 / 3))
    assert ev.retrieval_top1(src, tgt, outcomes=True)[2] == "110"            # src->tgt, per row
    with pytest.raises(ValueError):
        ev.retrieval_top1(src, tgt[:2])


# ---------------------------------------------------------------------------------------------- reporting

def _cells(table, row):
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_table_averages_and_zero_shot_average():
    results = {"baseline": {"eng": 90.0, "deu": 80.0, "fra": 70.0},
               "ours": {"eng": 91.0, "deu": 84.0, "fra": 77.0}}
    table = ev.markdown_table(results, train_lang="eng")
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == ["method", "eng", "deu", "fra", "avg", "zero-shot avg"]
    assert _cells(table, "baseline") == ["baseline", "90.0", "80.0", "70.0", "80.0", "75.0"]
    assert _cells(table, "ours") == ["ours", "91.0", "84.0", "77.0", "84.0", "80.5"]
    # without a train language there is no zero-shot column; a single flat row works; digits are honoured
    single = ev.markdown_table({"eng": 50.0, "deu": 25.25}, digits=2)
    assert "zero-shot" not in single
    assert _cells(single, "score") == ["score", "50.00", "25.25", "37.62"]
    # a missing cell prints '-' and the row's average is over the languages it has
    gaps = ev.markdown_table({"a": {"x": 10.0, "y": 20.0}, "b": {"x": 40.0}})
    assert _cells(gaps, "b") == ["b", "40.0", "-", "40.0"]


def test_paired_bootstrap_by_hand():
    # one seed, d = 100 (a - b) = (100, 0): a resample draws sentence 0 twice, once or never (1/4, 1/2, 1/4), so
    # its mean is 100, 50 or 0; the 2.5th and 97.5th percentiles of that distribution are 0 and 100
    assert ev.paired_bootstrap([[1, 1]], [[0, 1]], n=2000) == (50.0, 0.0, 100.0)
    assert ev.paired_bootstrap([1, 0], [0, 0], n=2000) == (50.0, 0.0, 100.0)          # 1-D: one seed
    assert ev.paired_bootstrap([[1], [0]], [[0], [0]], n=2000) == (50.0, 0.0, 100.0)  # the seeds are resampled too
    # two seeds x two sentences, only cell (0, 0) differs: statistic = 100 c w / 4 with c, w ~ Binomial(2, 1/2) the
    # draws of seed 0 and of sentence 0: 0, 25, 50, 100 with probabilities 7/16, 4/16, 4/16, 1/16 -> (25, 0, 100)
    assert ev.paired_bootstrap([[1, 0], [0, 0]], [[0, 0], [0, 0]], n=2000) == (25.0, 0.0, 100.0)


def test_paired_bootstrap_ratio_of_sums_by_hand():
    # POS-like: sentence 0 has 3 words (a 3 correct, b 1), sentence 1 has 1 word (both 0). A resample draws
    # sentence 0 twice, once or never (1/4, 1/2, 1/4): 100 (2 x 2) / 6 = 66.7, 100 2 / 4 = 50, 0 / 2 = 0; the
    # full sample: 100 (3 - 1) / 4 = 50
    mean, low, high = ev.paired_bootstrap([3, 0], [1, 0], n=2000, weights=[3, 1])
    assert mean == 50.0 and low == 0.0 and high == pytest.approx(200 / 3)
    # all weights 1 is the plain mean
    assert ev.paired_bootstrap([[1, 0]], [[0, 0]], n=500, weights=[1, 1]) == ev.paired_bootstrap([1, 0], [0, 0], n=500)
    with pytest.raises(ValueError, match="weights"):
        ev.paired_bootstrap([3, 0], [1, 0], weights=[3, 0])


def test_compare_pools_test_sets_equally_and_makes_one_table():
    # two seeds; test set x: 4 sentences, y: 2. Seed 1: ours +50 on x (2 of 4), +50 on y; seed 2: +25 on x, 0 on y.
    # The tables' zero-shot avg difference: mean over seeds of mean over sets = ((50 + 50) / 2 + (25 + 0) / 2) / 2
    outcomes = {"ours": {1: {"x": "1100", "y": "10", "e": "1"}, 2: {"x": "1000", "y": "00", "e": "1"}},
                "base": {1: {"x": "0000", "y": "00", "e": "1"}, 2: {"x": "0000", "y": "00", "e": "0"}},
                "pos": {1: {"p": "2/3 1/1"}}, "pos base": {1: {"p": "1/3 1/1"}}}
    rows = ev.compare(outcomes, [("ours", "base", "zero-shot avg", ["x", "y"]), ("ours", "base", "e", ["e"]),
                                 ("pos", "pos base", "p", ["p"]), ("ours", "missing", "x", ["x"])])
    assert [r["test"] for r in rows] == ["zero-shot avg", "e", "p"]             # no finished baseline: no row
    zs, e, p = rows
    assert zs["difference"] == pytest.approx(31.25) and zs["seeds"] == [1, 2] and zs["sentences"] == 6
    assert zs["low"] <= zs["difference"] <= zs["high"]
    assert e["difference"] == pytest.approx(50.0) and (e["low"], e["high"]) == (0.0, 100.0)   # one cell, seeds drawn
    assert p["difference"] == pytest.approx(25.0)                                # 100 (2 - 1) / 4 words
    outcomes["ours"][3], outcomes["base"][3] = {"x": "1111"}, {"x": "0000", "y": "00"}    # ours lacks y: left out
    assert ev.compare(outcomes, [("ours", "base", "zero-shot avg", ["x", "y"])]) == [zs]
    assert rows == ev.compare(outcomes, [(r["method"], r["baseline"], r["test"], s) for r, s in
                                         zip(rows, (["x", "y"], ["e"], ["p"]))])  # deterministic
    table = ev.comparison_table(rows)
    assert f"| ours | base | zero-shot avg | +31.2 | [{zs['low']:+.1f}, {zs['high']:+.1f}] | 2 x 6 |" in table
    assert "| pos | pos base | p | +25.0 |" in table
    honest = ev.compare(outcomes, [("ours", "base", "zero-shot avg", ["x", "y"])], why_not="macro-F1")
    assert honest == [{"method": "ours", "baseline": "base", "test": "zero-shot avg", "difference": None,
                       "low": None, "high": None, "note": "macro-F1"}]
    assert "| - | not computed: macro-F1 | - |" in ev.comparison_table(honest)
    with pytest.raises(ValueError, match="same sentences"):
        ev.compare({"a": {1: {"x": "10"}}, "b": {1: {"x": "100"}}}, [("a", "b", "x", ["x"])])


def test_paired_bootstrap_interval_shrinks_with_sentences_and_is_deterministic():
    g = torch.Generator().manual_seed(0)

    def system(p, shape):
        return (torch.rand(shape, generator=g) < p).double()
    widths = {}
    for sentences in (100, 1600):                      # one seed: with three, resampling seeds adds much noise
        a, b = system(0.7, (1, sentences)), system(0.6, (1, sentences))
        mean, low, high = ev.paired_bootstrap(a, b, seed=1)
        widths[sentences] = high - low
    assert 3.2 < widths[100] / widths[1600] < 4.8                                      # ~ 1 / sqrt(sentences)
    a, b = system(0.7, (3, 200)), system(0.6, (3, 200))
    mean, low, high = ev.paired_bootstrap(a, b, seed=1)
    assert low < mean < high and mean == pytest.approx(100 * (a - b).mean().item())
    assert ev.paired_bootstrap(a, b, seed=1) == (mean, low, high)                      # deterministic for a seed
    assert ev.paired_bootstrap(a, b, seed=2)[1:] != (low, high)
    assert ev.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)                                # identical systems
    with pytest.raises(ValueError, match="paired_bootstrap"):
        ev.paired_bootstrap(a, b[:, :10])


def test_write_json_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "results.json"
    obj = {"task": "sib200", "scores": {"eng_Latn": 81.4, "zho_Hans": 70.1}, "note": "ünïcode"}
    ev.write_json(path, obj)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8").startswith('{\n  "task"')        # indent 2
    ev.write_json(path, {"v": 2})                                           # replaces
    assert json.loads(path.read_text()) == {"v": 2}
    with pytest.raises(TypeError):                                          # not serialisable
        ev.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"v": 2}                        # old content intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left


# ---------------------------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_embed_all_layers_and_padding_invariance(tiny_checkpoint, model_type):
    path = tiny_checkpoint(model_type=model_type, layers=2)
    enc = model.Encoder.from_pretrained(path)
    tok = data.load_tokenizer(path)
    short = "the cat"
    long = "the first one and the other one were not in the new house of his"
    vecs = ev.embed(enc, tok, [short, long], "cpu", all_layers=True)
    assert vecs.shape == (3, 2, 32) and vecs.dtype == torch.float32          # L+1 states
    last = ev.embed(enc, tok, [short, long], "cpu")
    assert last.shape == (2, 32)
    torch.testing.assert_close(last, vecs[-1])
    # in a batch with the long sentence, the short one is padded: its vector must not change
    alone = ev.embed(enc, tok, [short], "cpu", all_layers=True)
    torch.testing.assert_close(vecs[:, :1], alone, atol=1e-5, rtol=1e-5)
    # and it is the plain mean of its token states, computed without any padding at all
    ids = torch.tensor([tok.encode(short).ids])
    enc.eval()
    with torch.no_grad():
        h = enc(ids, torch.ones_like(ids))
    torch.testing.assert_close(last[0], h[0].mean(0), atol=1e-5, rtol=1e-5)
    # the prefix is put before the text
    torch.testing.assert_close(ev.embed(enc, tok, ["cat"], "cpu", prefix="the "), last[:1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- prediction

class LengthHead(nn.Module):
    """Predicts each sequence's number of real tokens (so the prediction names its example), and records
    the training flags it saw."""
    num_labels = 64

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seen = encoder, []

    def forward(self, h, attention_mask):
        self.seen.append((self.training, self.encoder.training, torch.is_grad_enabled()))
        return nn.functional.one_hot(attention_mask.sum(1), self.num_labels).float()


def test_predict_keeps_original_order_and_restores_mode(tiny_checkpoint):
    path = tiny_checkpoint()
    enc = model.Encoder.from_pretrained(path)
    head = LengthHead(enc)
    lengths = [7, 3, 12, 5, 3, 9, 4, 11, 6]
    examples = [{"input_ids": list(range(5, 5 + n)), "token_type_ids": [0] * n} for n in lengths]
    enc.train()
    head.train()
    assert ev.predict(enc, head, examples, pad_id=0, device="cpu", batch_size=2) == lengths
    assert head.seen and all(s == (False, False, False) for s in head.seen)   # eval mode, no autograd
    assert enc.training and head.training                                     # modes restored
    enc.eval()
    assert ev.predict(enc, head, examples, pad_id=0, device="cpu", batch_size=4) == lengths
    assert not enc.training


class AlwaysTag(nn.Module):
    def __init__(self, tag):
        super().__init__()
        self.tag = tag

    def forward(self, h, attention_mask=None):
        return nn.functional.one_hot(torch.full(h.shape[:2], self.tag), len(data.UPOS_TAGS)).float()


def test_pos_accuracy_counts_every_word(tiny_checkpoint):
    path = tiny_checkpoint()
    enc = model.Encoder.from_pretrained(path)
    tok = data.load_tokenizer(path)
    sents = [{"words": ["the", "house", "was", "new"], "upos": ["DET", "NOUN", "AUX", "ADJ"]},
             {"words": ["a", "house"], "upos": ["DET", "NOUN"]}]
    det = AlwaysTag(data.UPOS_TAGS.index("DET"))
    assert ev.pos_accuracy(enc, det, tok, sents, "cpu") == pytest.approx(100 * 2 / 6)
    noun = AlwaysTag(data.UPOS_TAGS.index("NOUN"))
    assert ev.pos_accuracy(enc, noun, tok, sents, "cpu") == pytest.approx(100 * 2 / 6)
    # max_len 3 = [CLS] word [SEP]: the words cut off count as wrong, not as absent
    assert ev.pos_accuracy(enc, det, tok, sents, "cpu", max_len=3) == pytest.approx(100 * 2 / 6)
    assert ev.pos_accuracy(enc, noun, tok, sents, "cpu", max_len=3) == pytest.approx(0.0)
    # per sentence: correct/words
    assert ev.pos_accuracy(enc, det, tok, sents, "cpu", outcomes=True)[1] == "1/4 1/2"
    assert ev.pos_accuracy(enc, noun, tok, sents, "cpu", max_len=3, outcomes=True)[1] == "0/4 0/2"


# ---------------------------------------------------------------------------------------------- command line

def _finetuned(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint()
    enc = model.Encoder.from_pretrained(path)
    tok = data.load_tokenizer(path)
    torch.manual_seed(0)
    head = model.ClassificationHead(enc.config.hidden_size, len(data.SIB200_LABELS))
    nn.init.normal_(head.out.weight, std=1.0)     # predictions that differ between sentences
    out = tmp_path / "finetuned"
    model.save_pretrained(enc, out, tokenizer=tok, head=head)
    return out, path


def test_cli_sib200_writes_documented_json(tiny_checkpoint, tmp_path, data_dir):
    ckpt, _ = _finetuned(tiny_checkpoint, tmp_path)
    out = tmp_path / "res" / "results.json"
    ev.main(["--model", str(ckpt), "--task", "sib200", "--langs", "eng_Latn,fra_Latn", "--out", str(out),
             "--data_dir", str(data_dir), "--device", "cpu"])
    res = json.loads(out.read_text())
    assert res["task"] == "sib200" and res["model"] == str(ckpt)
    assert list(res["scores"]) == ["eng_Latn", "fra_Latn"]
    assert all(0 <= v <= 100 and round(v, 1) == v for v in res["scores"].values())
    assert res["average"] == pytest.approx(sum(res["scores"].values()) / 2, abs=0.051)
    # the same numbers as the library call
    enc, head, _ = model.load_with_head(ckpt)
    direct = ev.sib200_scores(enc, head, data.load_tokenizer(ckpt), data_dir, ["eng_Latn", "fra_Latn"], "cpu")
    assert res["scores"] == {k: round(v, 1) for k, v in direct.items()}


def test_cli_tatoeba_per_layer_json(tiny_checkpoint, tmp_path, data_dir):
    path = tiny_checkpoint(layers=2)
    out = tmp_path / "tatoeba.json"
    ev.main(["--model", str(path), "--task", "tatoeba", "--langs", "amh", "--per_layer", "--out", str(out),
             "--data_dir", str(data_dir), "--device", "cpu"])
    res = json.loads(out.read_text())
    assert res["task"] == "tatoeba" and res["prefix"] == ""
    assert list(res["scores"]) == ["amh"] and res["average"] == res["scores"]["amh"]
    assert len(res["per_layer"]["amh"]) == 3                        # embeddings + 2 layers
    assert res["per_layer"]["amh"][-1] == res["scores"]["amh"]      # the last state is the score
    assert set(res["directions"]["amh"]) == {"xx->en", "en->xx"}


def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path, data_dir):
    plain = tiny_checkpoint()                                        # an encoder without a task head
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(plain), "--task", "sib200", "--langs",
                        "eng_Latn", "--data_dir", str(data_dir), "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no xlt_head" in lines[0], r.stderr
    # the other bad inputs raise XltError, which the same `except` turns into one line
    for args, says in ((["--task", "tatoeba", "--langs", "xyz"], "no language xyz"),
                       (["--task", "sib200", "--langs", "deu"], "FLORES-200 codes"),
                       (["--task", "sib200", "--per_layer"], "--per_layer")):
        with pytest.raises(model.XltError, match=says):
            ev.main(["--model", str(plain), *args, "--data_dir", str(data_dir), "--device", "cpu"])


def test_resolve_prefix_is_explicit():
    assert ev.resolve_prefix("auto", "intfloat/multilingual-e5-small") == "query: "
    assert ev.resolve_prefix("auto", "sentence-transformers/all-MiniLM-L6-v2") == ""
    assert ev.resolve_prefix("auto", "out/finetune/best") == ""
    assert ev.resolve_prefix("", "intfloat/multilingual-e5-small") == ""
    assert ev.resolve_prefix("passage: ", "x") == "passage: "


def test_default_languages():
    assert len(ev.DEFAULT_SIB200_LANGS) == 14 and "eng_Latn" in ev.DEFAULT_SIB200_LANGS
    assert len({lang.split("_")[1] for lang in ev.DEFAULT_SIB200_LANGS}) >= 7       # scripts


def test_prefix_auto_prefers_the_prefix_a_checkpoint_was_fine_tuned_with(tmp_path):
    (tmp_path / "config.json").write_text('{"xlt_prefix": "query: "}')
    assert ev.resolve_prefix("auto", tmp_path) == "query: " and ev.resolve_prefix(None, tmp_path) == "query: "
    (tmp_path / "config.json").write_text('{"xlt_prefix": ""}')                 # saved as none: stays none
    assert ev.resolve_prefix("auto", tmp_path) == "" and ev.resolve_prefix("passage: ", tmp_path) == "passage: "
