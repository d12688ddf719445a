"""Tests of mblm.py: routing, branch independence, mixtures, the losses, caching, checkpoints, end to end."""
import json
import math

import pytest
import torch

import data
import mblm
import model
from model import Config, Encoder, XltError

LANGS = ["eng_Latn", "fra_Latn", "deu_Latn"]


def config(layers=3):
    return Config(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)


def tiny(layers=3, branch_layers=1, langs=LANGS, frozen=0, seed=0):
    torch.manual_seed(seed)
    enc = Encoder(config(layers))
    m = mblm.MBLM(enc, langs, branch_layers, num_labels=7, frozen=frozen)
    torch.nn.init.normal_(m.head.out.weight, std=1.0)      # a head that makes differences visible
    m.head.dropout.p = 0.0
    return m


def batch(B=4, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "label": torch.randint(0, 7, (B,), generator=g), "teacher_logits": torch.randn(B, 7, generator=g)}


def load_mblm(out_dir):
    """(MBLM, tokenizer) from mblm.save_mblm's output: the shared bottom and head from the first directory,
    branch j from the top blocks of directory j (whose bottom must equal the first one's)."""
    meta = json.loads((out_dir / "mblm.json").read_text())
    k, dirs = meta["branch_layers"], meta["dirs"]
    loaded = [model.load_with_head(out_dir / d)[:2] for d in dirs]
    L = loaded[0][0].config.num_hidden_layers
    tops = [enc.layers[L - k:] for enc, _ in loaded]      # before MBLM() takes the first encoder's top off
    bottom = {n: v for n, v in loaded[0][0].state_dict().items() if not n.startswith("layers.") or
              int(n.split(".")[1]) < L - k}
    for enc, _ in loaded[1:]:
        sd = enc.state_dict()
        assert all(torch.equal(v, sd[n]) for n, v in bottom.items()), "the branches' shared bottoms differ"
    head = loaded[0][1]
    m = mblm.MBLM(loaded[0][0], meta["langs"], k, head.num_labels, head.pooling)
    m.head = head
    for branch, top in zip(m.branches, tops):
        branch.load_state_dict(top.state_dict())
    return m, data.load_tokenizer(out_dir / dirs[0])


def grads(module):
    return [p.grad for p in module.parameters()]


def nonzero(gs):
    return all(g is not None and g.abs().sum() > 0 for g in gs)


def test_routing_sends_each_language_to_its_branch():
    m = tiny()
    b = batch()
    with torch.no_grad():
        x, mask = m.bottom(b)
        for j, lang in enumerate(LANGS):
            assert m.route(lang) == j
            want = m.head(m.branch(j, x, mask), b["attention_mask"])
            torch.testing.assert_close(m(b, lang), want)
        assert m.route("spa_Latn") is None
        # The different branches were copies at init; after perturbing they must give different outputs.
        for j in range(3):
            for p in m.branches[j].parameters():
                p.add_(0.1 * torch.randn_like(p))
        outs = [m(b, lang) for lang in LANGS]
        assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_bottom_is_the_encoders_first_blocks():
    torch.manual_seed(0)
    enc = Encoder(config(3)).eval()
    b = batch()
    full = enc(b["input_ids"], b["attention_mask"])
    top = [p.detach().clone() for p in enc.layers[2:].parameters()]
    m = mblm.MBLM(enc, LANGS, 1, 7).eval()
    assert len(m.encoder.layers) == 2 and m.n_shared == 2
    with torch.no_grad():
        x, mask = m.bottom(b)
        for j in range(3):       # at init every branch reproduces the pretrained encoder exactly
            torch.testing.assert_close(m.branch(j, x, mask), full)
            for p, q in zip(m.branches[j].parameters(), top):
                torch.testing.assert_close(p, q)


def test_branches_are_independent_copies_and_the_bottom_is_shared():
    m = tiny()
    ptrs = [{p.data_ptr() for p in br.parameters()} for br in m.branches]
    assert not (ptrs[0] & ptrs[1]) and not (ptrs[1] & ptrs[2])
    b = batch()
    with torch.no_grad():
        before = [m(b, lang) for lang in LANGS]
        for p in m.branches[0].parameters():     # editing one branch changes that language only
            p.mul_(1.5)
        after = [m(b, lang) for lang in LANGS]
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    torch.testing.assert_close(before[2], after[2])
    # A loss through any single branch reaches the one shared bottom, and no other branch.
    for j, lang in enumerate(LANGS):
        m.zero_grad(set_to_none=True)
        mblm.mblm_loss(m, b, lang, alpha=0.5, temperature=2.0, zs_weight=0.0).backward()
        assert nonzero(grads(m.encoder.layers)), lang
        assert nonzero(grads(m.branches[j]))
        assert all(g is None for i in range(3) if i != j for g in grads(m.branches[i]))


def test_mixture_weights_are_convex():
    u = mblm.mixture_weights(5, 4, "uniform", "cpu")
    torch.testing.assert_close(u, torch.full((5, 4), 0.25))
    torch.manual_seed(0)
    r = mblm.mixture_weights(1000, 3, "random", "cpu")
    assert (r >= 0).all()
    torch.testing.assert_close(r.sum(1), torch.ones(1000))
    assert r.std(0).min() > 0.1                          # random, not constant
    torch.testing.assert_close(r.mean(0), torch.full((3,), 1 / 3), atol=0.03, rtol=0)   # Dirichlet(1,1,1) mean
    with pytest.raises(XltError):
        mblm.mixture_weights(2, 2, "softmax", "cpu")


def test_distill_loss_matches_hand_computation():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 2])
    T, a = 2.0, 0.3

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]
    hard = soft = 0.0
    for zi, ti, yi in zip(z.tolist(), t.tolist(), y.tolist()):
        hard -= math.log(softmax(zi)[yi]) / 2
        pt, ps = softmax([x / T for x in ti]), softmax([x / T for x in zi])
        soft -= sum(p * math.log(q) for p, q in zip(pt, ps)) / 2
    want = (1 - a) * hard + a * T * T * soft
    assert mblm.distill_loss(z, y, t, a, T).item() == pytest.approx(want, rel=1e-6)
    assert mblm.distill_loss(z, y, t, 0.0, T).item() == pytest.approx(hard, rel=1e-6)


def test_zero_shot_aware_term():
    m = tiny()
    b = batch()
    # Gradient reaches every branch (its own and the zero-shot ones) and the shared bottom.
    m.zero_grad(set_to_none=True)
    mblm.mblm_loss(m, b, "fra_Latn", 0.5, 2.0, zs_weight=1.0, mixture="random").backward()
    assert nonzero(grads(m.encoder.layers))
    assert all(nonzero(grads(br)) for br in m.branches)
    # Its value: ell(own branch) + lambda * ell(head(uniform mixture of the other branches)).
    with torch.no_grad():
        x, mask = m.bottom(b)
        own = m.head(m.branch(1, x, mask), b["attention_mask"])
        mix = m.head((m.branch(0, x, mask) + m.branch(2, x, mask)) / 2, b["attention_mask"])
        ell = lambda z: mblm.distill_loss(z, b["label"], b["teacher_logits"], 0.5, 2.0)   # noqa: E731
        got = mblm.mblm_loss(m, b, "fra_Latn", 0.5, 2.0, zs_weight=0.7, mixture="uniform")
    torch.testing.assert_close(got, ell(own) + 0.7 * ell(mix))
    # Without branches there is nothing to be zero-shot for.
    plain = tiny(langs=None)
    with pytest.raises(XltError):
        mblm.mblm_loss(plain, b, "eng_Latn", 0.5, 2.0, zs_weight=1.0)


def test_inference_own_branch_or_mixture():
    m = tiny()
    b = batch()
    with torch.no_grad():
        x, mask = m.bottom(b)
        for j in range(3):
            for p in m.branches[j].parameters():
                p.add_(0.1 * torch.randn_like(p))
        hs = [m.branch(j, x, mask) for j in range(3)]
        torch.testing.assert_close(m(b, "spa_Latn"), m.head(sum(hs) / 3, b["attention_mask"]))
        before = {lang: m(b, lang) for lang in LANGS + ["spa_Latn"]}
        for p in m.branches[2].parameters():      # perturb deu's branch
            p.add_(torch.randn_like(p))
        after = {lang: m(b, lang) for lang in LANGS + ["spa_Latn"]}
    torch.testing.assert_close(before["eng_Latn"], after["eng_Latn"])
    torch.testing.assert_close(before["fra_Latn"], after["fra_Latn"])
    assert not torch.allclose(before["deu_Latn"], after["deu_Latn"])
    assert not torch.allclose(before["spa_Latn"], after["spa_Latn"])   # the mixture uses every branch
    # The one-top model (baselines) uses its single top for every language.
    plain = tiny(langs=None)
    with torch.no_grad():
        torch.testing.assert_close(plain(b, "eng_Latn"), plain(b, "spa_Latn"))


def test_cached_frozen_states_give_the_same_outputs():
    m = tiny(layers=4, branch_layers=1, frozen=2).eval()
    b = batch(B=3, T=5)
    examples = [{"input_ids": b["input_ids"][i, :int(b["attention_mask"][i].sum())].tolist(),
                 "token_type_ids": [0] * int(b["attention_mask"][i].sum()), "label": 1} for i in range(3)]
    plain = [dict(e) for e in examples]
    mblm.frozen_states(m.encoder, examples, 2, pad_id=0, device=torch.device("cpu"))
    table, lengths = examples[0]["states"]["table"], [len(e["input_ids"]) for e in examples]
    assert lengths[:2] == [4, 5] and table.shape == (sum(lengths) + 1, 16) and not table[-1].any()
    assert [e["states"]["start"] for e in examples] == [0, 4, 9]
    assert all(e["states"]["table"] is table for e in examples)
    with torch.no_grad():        # each example's rows are the frozen blocks' output of that example alone
        alone = m.encoder(torch.tensor([examples[1]["input_ids"]]), layers=2)[0]
    torch.testing.assert_close(table[4:9], alone)
    for lang in ["eng_Latn", "spa_Latn"]:
        torch.testing.assert_close(mblm.predict(m, examples, lang, 0, "cpu"), mblm.predict(m, plain, lang, 0, "cpu"))
    mblm.freeze(m)
    assert not any(p.requires_grad for p in m.encoder.embed.parameters())
    assert not any(p.requires_grad for p in m.encoder.layers[:2].parameters())
    assert all(p.requires_grad for p in m.encoder.layers[2:].parameters())
    m0 = tiny(frozen=0)
    mblm.freeze(m0)
    assert not m0.encoder.embed.word.weight.requires_grad and m0.encoder.embed.position.weight.requires_grad
    with pytest.raises(XltError):
        tiny(layers=3, branch_layers=2, frozen=2)


def test_language_batches_one_language_per_batch():
    sets = {"eng_Latn": [{"input_ids": [0] * (1 + i % 5)} for i in range(23)],
            "fra_Latn": [{"input_ids": [0] * (1 + i % 3)} for i in range(10)]}
    first = mblm.language_batches(sets, 4, seed=0, epoch=0)
    assert first == mblm.language_batches(sets, 4, seed=0, epoch=0)          # reproducible
    for lang, ex in sets.items():       # every example of every language exactly once, batches never mixed
        assert sorted(i for lg, idx in first if lg == lang for i in idx) == list(range(len(ex)))
    assert len(first) == 6 + 3
    second = mblm.language_batches(sets, 4, seed=0, epoch=1)
    assert len(second) == len(first) and second != first                   # same count, new order


def test_save_and_load_round_trip(tmp_path):
    from data import wordpiece_tokenizer
    from conftest import tiny_vocab
    (tmp_path / "vocab.txt").write_text("\n".join(tiny_vocab()[:40]) + "\n")      # no id past the model's 40 rows
    tok = wordpiece_tokenizer(tmp_path / "vocab.txt", lowercase=True)
    m = tiny().eval()
    with torch.no_grad():
        for p in m.branches[1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    mblm.save_mblm(m, tmp_path / "out", tok)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(LANGS + ["mblm.json"])
    cfg = json.loads((tmp_path / "out" / "fra_Latn" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["mblm"]["branch"] == "fra_Latn"
    m2, _ = load_mblm(tmp_path / "out")
    m2.eval()
    b = batch()
    with torch.no_grad():
        for lang in LANGS + ["spa_Latn"]:
            torch.testing.assert_close(m2(b, lang), m(b, lang))


def test_bad_arguments(data_dir):
    assert mblm.parse_teachers("eng_Latn=a, fra_Latn=b/c") == {"eng_Latn": "a", "fra_Latn": "b/c"}
    for bad in ["eng_Latn", "eng_Latn=", "=x", "eng_Latn=a,eng_Latn=b"]:
        with pytest.raises(XltError):
            mblm.parse_teachers(bad)
    with pytest.raises(XltError, match="train_layers"):
        mblm.main(["--train_layers", "1", "--branch_layers", "2"])
    for flags in (["--alpha", "1.5"], ["--variants", "mblm", "bogus"], ["--mixture", "softmax"], ["--langs", ""]):
        with pytest.raises(SystemExit):           # argparse's types and choices
            mblm.main(flags)
    # --langs: the test languages; leaving out a supervised language, or an unknown one, fails before any loading.
    for langs, msg in (("deu_Latn,swh_Latn", "missing eng_Latn"), ("eng_Latn,xyz_Latn", "xyz")):
        with pytest.raises(XltError, match=msg):
            mblm.main(["--data_dir", str(data_dir), "--langs", langs, "--student", "/nonexistent"])
    with pytest.raises(XltError, match="two languages"):
        mblm.main(["--data_dir", str(data_dir), "--teachers", "eng_Latn=/nonexistent", "--variants", "mblm"])


def test_end_to_end(tiny_checkpoint, data_dir, tmp_path, device):
    """main() on tiny random models, two seeds: one plain teacher (fine-tuned here) and one saved
    classifier (used as is)."""
    student = tiny_checkpoint("student", layers=3, seed=0)
    plain = tiny_checkpoint("teacher_en", layers=2, seed=1)
    clf_src = tiny_checkpoint("teacher_fr", layers=2, seed=2, model_type="roberta")
    from model import ClassificationHead, save_pretrained
    enc = Encoder.from_pretrained(clf_src)
    save_pretrained(enc, tmp_path / "clf_fr", tokenizer=data.load_tokenizer(clf_src), head=ClassificationHead(32, 7))
    out = tmp_path / "out"
    r = mblm.main(["--data_dir", str(data_dir), "--student", str(student),
                   "--teachers", f"eng_Latn={plain},fra_Latn={tmp_path / 'clf_fr'}",
                   "--langs", "eng_Latn,fra_Latn,deu_Latn,zho_Hans", "--limit", "12", "--eval_limit", "10",
                   "--epochs", "2", "--teacher_epochs", "1", "--branch_layers", "1", "--train_layers", "2",
                   "--batch_size", "4", "--out_dir", str(out), "--mixture", "random", "--seeds", "0", "1",
                   "--device", device])
    assert r == json.loads((out / "results.json").read_text())
    assert set(r) == {"script", "paper", "command", "config", "seeds", "results", "mean", "std", "comparisons", "units",
                      "hardware", "seconds", "details"}
    assert r["script"] == "mblm.py" and r["seeds"] == [0, 1] and r["seconds"] > 0
    assert r["details"]["supervised"] == ["eng_Latn", "fra_Latn"]
    assert r["details"]["zero_shot"] == ["deu_Latn", "zho_Hans"]
    for seed in ("0", "1"):
        rows, logs = r["results"][seed], r["details"]["seeds"][seed]
        assert list(rows) == ["teachers"] + list(mblm.VARIANTS)
        assert set(rows["teachers"]) == {"eng_Latn", "fra_Latn", "supervised avg"}
        assert logs["teachers"]["eng_Latn"]["fine_tuned_here"] and not logs["teachers"]["fra_Latn"]["fine_tuned_here"]
        for name in mblm.VARIANTS:
            assert set(rows[name]) == {"eng_Latn", "fra_Latn", "deu_Latn", "zho_Hans", "supervised avg",
                                       "zero-shot avg"}
            assert 0 <= rows[name]["supervised avg"] <= 100 and 0 <= rows[name]["zero-shot avg"] <= 100
            assert len(logs[name]["dev"]) == 2 and logs[name]["best_epoch"] in (1, 2)
        assert logs["vanilla"]["teacher_minus_student"] == {   # the premise, kept: teacher minus student per language
            x: round(logs["teachers"][x]["test_accuracy"] - rows["vanilla"][x], 2) for x in ("eng_Latn", "fra_Latn")}
    assert r["std"]["mblm"]["eng_Latn"] is not None and r["config"]["mixture"] == "random"
    md = (out / "results.md").read_text()
    assert "| MBLM (full) |" in md and "± " in md and "| teachers (each on its own language) |" in md
    # paired bootstrap CIs over test sentences and both seeds: the tables' differences of means
    assert [(c["method"], c["baseline"], c["test"]) for c in r["comparisons"]] == [
        (m, b, t) for m, b in (("mblm", "vanilla"), ("mblm", "mblm_no_zs"), ("multi_teacher", "vanilla"))
        for t in ("zero-shot avg", "supervised avg")] + [("teachers", "vanilla", x) for x in ("eng_Latn", "fra_Latn")]
    for c in r["comparisons"]:                          # the teachers: each on its own language's test set
        assert c["seeds"] == [0, 1] and c["sentences"] == (10 if c["method"] == "teachers" else 20)
        assert c["low"] <= c["difference"] <= c["high"]
        assert c["difference"] == pytest.approx(r["mean"][c["method"]][c["test"]] - r["mean"][c["baseline"]][c["test"]])
        assert f"| {c['method']} | {c['baseline']} | {c['test']} | {c['difference']:+.1f} |" in md
    m, _ = load_mblm(out / "mblm")
    assert m.langs == ["eng_Latn", "fra_Latn"] and len(m.branches) == 2


def test_student_layers_cuts_the_student_not_its_stand_in_teacher(tiny_checkpoint, data_dir, tmp_path, device,
                                                                  monkeypatch):
    """--student_layers 2 of 3: the student's classifiers are 2-block models (saved so, loadable), while the
    same checkpoint as a (stand-in) teacher keeps its 3 blocks."""
    student = tiny_checkpoint("student", layers=3, seed=0)
    plain = tiny_checkpoint("teacher_en", layers=2, seed=1)
    out, teacher_blocks, make_teacher = tmp_path / "out", {}, mblm.make_teacher

    def spy(lang, src, *args):
        teacher_blocks[lang] = len(src.encoder.layers)
        return make_teacher(lang, src, *args)
    monkeypatch.setattr(mblm, "make_teacher", spy)
    r = mblm.main(["--data_dir", str(data_dir), "--student", str(student), "--student_layers", "2",
                   "--teachers", f"eng_Latn={plain},fra_Latn={student}", "--langs", "eng_Latn,fra_Latn,deu_Latn",
                   "--limit", "8", "--eval_limit", "6", "--epochs", "1", "--teacher_epochs", "1",
                   "--branch_layers", "1", "--train_layers", "2", "--batch_size", "4", "--variants", "mblm",
                   "--out_dir", str(out), "--device", device])
    assert r["config"]["student_layers"] == 2
    for lang in ("eng_Latn", "fra_Latn"):
        enc, head, cfg = model.load_with_head(out / "mblm" / lang)
        assert cfg["num_hidden_layers"] == len(enc.layers) == 2 and head.num_labels == len(data.SIB200_LABELS)
    m, _ = load_mblm(out / "mblm")
    assert len(m.encoder.layers) == 1 and len(m.branches[0]) == 1
    assert teacher_blocks == {"eng_Latn": 2, "fra_Latn": 3}     # the student's checkpoint as a teacher: all 3
    with pytest.raises(XltError, match="--student_layers 4"):
        mblm.main(["--data_dir", str(data_dir), "--student", str(student), "--student_layers", "4",
                   "--teachers", f"eng_Latn={plain},fra_Latn={plain}", "--out_dir", str(tmp_path / "o2")])
