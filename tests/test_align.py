"""Tests of align.py: MoCo's loss, momentum update and queue, TLM batches, random input shuffling,
code-switching, and an end-to-end run on tiny random checkpoints."""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import align  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
from model import Config, Encoder, XltError  # noqa: E402


def tiny_encoder(seed=0, mlm_head=True, vocab=50):
    torch.manual_seed(seed)
    cfg = Config(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    return Encoder(cfg, mlm_head=mlm_head)


SPECIAL = {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "unk": 1}


# ---------------------------------------------------------------------------------------------------- MoCo

def test_moco_loss_matches_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    expected = []
    for qi, ki in zip(q.tolist(), k.tolist()):
        pos = math.exp((qi[0] * ki[0] + qi[1] * ki[1]) / tau)
        neg = sum(math.exp((qi[0] * n[0] + qi[1] * n[1]) / tau) for n in queue.tolist())
        expected.append(-math.log(pos / (pos + neg)))
    assert align.moco_loss(q, k, queue, tau).item() == pytest.approx(sum(expected) / 2, rel=1e-6)

    # with ids: the queue entry from query 0's own pair (id 7) is not one of its negatives
    query_ids, queue_ids = torch.tensor([7, 8]), torch.tensor([7, 1, 2])
    qi, ki = q[0].tolist(), k[0].tolist()
    pos = math.exp((qi[0] * ki[0] + qi[1] * ki[1]) / tau)
    neg = sum(math.exp((qi[0] * n[0] + qi[1] * n[1]) / tau) for n in queue.tolist()[1:])
    masked0 = -math.log(pos / (pos + neg))
    got = align.moco_loss(q, k, queue, tau, query_ids, queue_ids).item()
    assert got == pytest.approx((masked0 + expected[1]) / 2, rel=1e-6)
    assert got != pytest.approx(sum(expected) / 2, rel=1e-3)


def test_moco_loss_is_fp32_under_bf16_autocast():
    """The loss is the same number with or without a bf16 autocast around it (the GPU scripts' setting)."""
    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(8, 64, generator=g), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(256, 64, generator=g), dim=1)
    plain = align.moco_loss(q, k, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = align.moco_loss(q, k, queue, 0.07)
        bf16 = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.07,
                               torch.zeros(8, dtype=torch.long))
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    assert bf16.item() != pytest.approx(plain.item(), abs=1e-4)     # what autocast alone would have computed


def test_momentum_update_formula_and_frozen_skip():
    f_q = tiny_encoder(0)
    f_k = align.key_encoder(f_q)
    assert f_k.mlm is None and f_q.mlm is not None
    with torch.no_grad():                      # make the two encoders differ
        for p in f_q.parameters():
            p.add_(torch.randn_like(p))
    f_q.embed.word.weight.requires_grad_(False)
    k0 = {n: p.clone() for n, p in f_k.named_parameters()}
    q0 = dict(f_q.named_parameters())
    align.momentum_update(f_q, f_k, 0.9)
    for name, p in f_k.named_parameters():
        if name == "embed.word.weight":
            assert torch.equal(p, k0[name])    # frozen in f_q: skipped
        else:
            torch.testing.assert_close(p, 0.9 * k0[name] + 0.1 * q0[name])


def test_queue_is_fifo_with_fixed_size():
    g = torch.Generator().manual_seed(0)
    queue = align.KeyQueue(5, 2, "cpu", g)
    assert queue.keys.shape == (5, 2) and torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    pushed = []
    for step in range(4):                     # 4 batches of 2 = 8 keys through a queue of 5
        keys = torch.tensor([[float(2 * step), 0.0], [float(2 * step + 1), 0.0]])
        queue.push(keys, torch.tensor([2 * step, 2 * step + 1]))
        pushed += [2 * step, 2 * step + 1]
        assert queue.keys.shape == (5, 2)
    keys, ids = torch.roll(queue.keys, -queue.ptr, 0), torch.roll(queue.ids, -queue.ptr, 0)   # oldest first
    assert ids.tolist() == pushed[-5:]                   # the 5 newest, oldest first
    assert keys[:, 0].tolist() == [float(i) for i in pushed[-5:]]
    with pytest.raises(XltError):
        queue.push(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- TLM

def test_tlm_positions_continue_and_masking_covers_both_sides():
    a, b = list(range(10, 30)), list(range(30, 45))
    ex = data.tlm_example(a, b, SPECIAL["cls"], SPECIAL["sep"], 64)
    examples = [ex] * 300
    g = torch.Generator().manual_seed(0)
    for offset in (0, 2):                     # BERT numbers positions from 0, RoBERTa/XLM-R from pad + 1
        batch = align.tlm_batch(examples, SPECIAL, 50, g, 0.15, offset)
        T = len(ex["input_ids"])
        assert batch["position_ids"][0, :T].tolist() == list(range(offset, offset + T))
        start_b = 1 + len(a) + 1               # [CLS] a [SEP] | b: the second sentence keeps counting
        assert batch["position_ids"][0, start_b].item() == offset + start_b
        assert batch["token_type_ids"].eq(0).all()          # no language / segment embeddings
    labels = torch.full(batch["input_ids"].shape, -100).view(-1)
    labels[batch["positions"]] = batch["targets"]
    labels = labels.view(batch["input_ids"].shape)
    masked = labels != -100
    side_a, side_b = masked[:, 1:1 + len(a)], masked[:, start_b:start_b + len(b)]
    # both sides are masked, at about 15% each; special tokens never
    assert 0.10 < side_a.float().mean() < 0.20 and 0.10 < side_b.float().mean() < 0.20
    assert not masked[:, 0].any() and not masked[:, 1 + len(a)].any() and not masked[:, start_b + len(b)].any()
    original = torch.tensor(ex["input_ids"] + [0] * (labels.shape[1] - T)).expand_as(labels)
    assert (labels[masked] == original[masked]).all()


def test_tlm_loss_only_at_masked_positions():
    f_q = tiny_encoder(0)
    g = torch.Generator().manual_seed(1)
    ex = data.tlm_example(list(range(10, 20)), list(range(20, 28)), 2, 3, 64)
    t = align.tlm_batch([ex, ex], SPECIAL, 50, g, 0.3, 0)
    f_q.eval()
    got = model.mlm_loss(f_q, t)[0]              # the TLM loss of the alignment step
    h = f_q(t["input_ids"], t["attention_mask"], t["token_type_ids"], t["position_ids"])
    logits = f_q.mlm_logits(h)
    labels = torch.full(t["input_ids"].shape, -100).view(-1)
    labels[t["positions"]] = t["targets"]
    want = F.cross_entropy(logits.view(-1, 50), labels, ignore_index=-100)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------- shuffling

def test_shuffle_coin_is_balanced():
    n = 20000
    heads = align.shuffle_coins(n, torch.Generator().manual_seed(0)).sum().item()
    assert abs(heads - n / 2) < 4 * math.sqrt(n / 4)          # 4 sigma of Binomial(n, 1/2)
    assert 0 < heads < n


def test_alignment_batch_routes_sides_by_the_coin():
    prepared = {"tlm_a": [[10, 11]] * 64, "tlm_b": [[20, 21, 22]] * 64,
                "single_a": [{"input_ids": [2, 10, 11, 3], "token_type_ids": [0] * 4}] * 64,
                "single_b": [{"input_ids": [2, 20, 21, 22, 3], "token_type_ids": [0] * 5}] * 64,
                "ids": list(range(64))}
    g = torch.Generator().manual_seed(0)
    batch, n_b = align.alignment_batch(prepared, list(range(64)), SPECIAL, 50, g, 32, 0.0)
    # mask_prob 0: nothing drawn, so data.mlm_batch masks the first real token (a loss is always defined)
    assert 0 < n_b < 64 and batch["tlm"]["positions"].tolist() == [1]
    b_query = batch["query"]["input_ids"][:, 1] == 20
    assert b_query.sum().item() == n_b
    # the query side is first in the TLM sequence, the key side is the other sentence
    assert batch["tlm"]["targets"].tolist() == [20 if b_query[0] else 10]        # row 0's token 1 is masked
    assert torch.equal(batch["tlm"]["input_ids"][1:, 1] == 20, b_query[1:])
    assert torch.equal(batch["key"]["input_ids"][:, 1] == 10, b_query)
    assert batch["ids"].tolist() == list(range(64))


# ---------------------------------------------------------------------------------------------------- training step

def _args(**kw):
    base = dict(max_len=32, train_embeddings=False, queue_size=8, align_lr=1e-3, weight_decay=0.0,
                compile=False, warmup=0.0, align_steps=2, align_batch_size=4, mask_prob=0.15, tlm_weight=1.0,
                temperature=0.07, momentum=0.9, pooling="mean", log_every=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_align_trains_query_encoder_only(tiny_checkpoint):
    ckpt = tiny_checkpoint()
    tok = data.load_tokenizer(ckpt)
    f_q = Encoder.from_pretrained(ckpt, mlm_head=True)
    q0 = {n: p.detach().clone() for n, p in f_q.named_parameters()}
    pairs = [{"a": f"the cat {i} is on the table", "b": f"le chat {i} est sur la table", "id": i, "lang": "fra"}
             for i in range(8)]
    args = _args()
    info, f_k = align.align(f_q, tok, pairs, args, torch.device("cpu"), seed=0)
    assert all(p.grad is None and not p.requires_grad for p in f_k.parameters())
    assert len(info["log"]) == 2 and all(math.isfinite(r["tlm"]) and math.isfinite(r["moco"]) for r in info["log"])
    q1 = dict(f_q.named_parameters())
    assert not torch.equal(q1["layers.0.qkv.weight"], q0["layers.0.qkv.weight"])      # f_q was trained
    assert torch.equal(q1["embed.word.weight"], q0["embed.word.weight"])              # frozen by default
    # the key encoder moved only by the momentum rule: after 2 steps, theta_k = m^2 theta_0 + ... != theta_q
    k = dict(f_k.named_parameters())["layers.0.qkv.weight"]
    assert not torch.equal(k, q0["layers.0.qkv.weight"]) and not torch.equal(k, q1["layers.0.qkv.weight"])


# ---------------------------------------------------------------------------------------------------- code-switching

def test_code_switch_single():
    texts = [f"en{i}" for i in range(300)]
    alts = [[f"de{i}", f"sw{i}"] for i in range(300)]
    out, used = align.code_switch_single(texts, alts, 0.3, np.random.default_rng(0))
    for i, (o, u) in enumerate(zip(out, used)):
        assert o == (texts[i] if u is None else alts[i][u])
    n = sum(u is not None for u in used)
    assert abs(n - 90) < 4 * math.sqrt(300 * 0.3 * 0.7)
    assert {u for u in used if u is not None} == {0, 1}
    assert align.code_switch_single(texts, alts, 0.0, np.random.default_rng(0))[0] == texts
    out1, _ = align.code_switch_single(texts, alts, 1.0, np.random.default_rng(0))
    assert all(o in a for o, a in zip(out1, alts))
    # no translation: kept even with p = 1
    assert align.code_switch_single(["x"], [[]], 1.0, np.random.default_rng(0)) == (["x"], [None])


# ---------------------------------------------------------------------------------------------------- data

def test_sib200_pairs_use_train_split_only(data_dir):
    pairs = align.sib200_pairs(data_dir, ["deu_Latn"])
    train_ids = {r["index_id"] for r in data.read_sib200(data_dir, "eng_Latn", "train")}
    test_ids = {r["index_id"] for r in data.read_sib200(data_dir, "eng_Latn", "test")}
    assert len(pairs) == len(train_ids) and {p["id"] for p in pairs} <= train_ids
    assert not {p["id"] for p in pairs} & test_ids
    eng = {r["index_id"]: r["text"] for r in data.read_sib200(data_dir, "eng_Latn", "train")}
    assert all(p["a"] == eng[p["id"]] for p in pairs)


def test_pud_pairs_are_parallel_and_disjoint_from_sib200(data_dir):
    pairs = align.pud_pairs(data_dir, ["deu_Latn", "isl_Latn"])
    assert len(pairs) == 2000 and [p["lang"] for p in pairs].count("isl_Latn") == 1000
    files = data.ud_pud_files(data_dir)
    english = data.read_conllu(files["en"])
    # joined on sent_id, not on order: Icelandic PUD lists its sentences in another order
    icelandic = {s["sent_id"]: s["text"] for s in data.read_conllu(files["is"])}
    for p in pairs[1000:]:
        assert p["a"] == english[p["id"]]["text"] and p["b"] == icelandic[english[p["id"]]["sent_id"]]
    german = data.read_conllu(files["de"])
    assert pairs[1]["a"].startswith("For those who follow social media") and pairs[1]["b"] == german[1]["text"]
    assert {p["id"] for p in pairs[:1000]} == {p["id"] for p in pairs[1000:]} == set(range(1000))
    assert align.overlap_with_sib200(pairs, data_dir, ["deu_Latn", "isl_Latn"]) == {"train": 0, "dev": 0, "test": 0}
    # the counter does count: SIB-200 train's own pairs all overlap the train split, none dev or test
    sib = align.sib200_pairs(data_dir, ["deu_Latn"])
    assert align.overlap_with_sib200(sib, data_dir, ["deu_Latn"]) == {"train": len(sib), "dev": 0, "test": 0}
    with pytest.raises(XltError, match="--align_langs: UD PUD has no swh_Latn"):
        align.pud_pairs(data_dir, ["deu_Latn", "swh_Latn"])


def test_sib200_translations_follow_index_id(data_dir):
    langs = ["deu_Latn", "fra_Latn"]
    translations = align.sib200_translations(data_dir, langs)
    for lang_i, lang in enumerate(langs):
        for r in data.read_sib200(data_dir, lang, "train"):
            assert translations[r["index_id"]][lang_i] == r["text"]      # one entry per language, in order


def test_file_pairs(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("the cat\tle chat\n\t\nthe dog\tle chien\n", encoding="utf-8")
    pairs = align.file_pairs([tsv])
    assert [(p["a"], p["b"], p["id"]) for p in pairs] == [("the cat", "le chat", 0), ("the dog", "le chien", 2)]
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("eins\nzwei\n", encoding="utf-8")
    assert [(p["a"], p["b"]) for p in align.file_pairs([tmp_path / "a.txt", tmp_path / "b.txt"])] == \
        [("one", "eins"), ("two", "zwei")]
    (tmp_path / "c.txt").write_text("uno\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="line-aligned"):
        align.file_pairs([tmp_path / "a.txt", tmp_path / "c.txt"])


def test_bad_arguments(tmp_path, data_dir):
    with pytest.raises(XltError, match="queue_size"):
        align.main(["--data_dir", str(data_dir), "--queue_size", "4", "--align_batch_size", "8"])
    with pytest.raises(SystemExit):                 # ranges: argparse types
        align.main(["--cs_prob", "1.5"])
    with pytest.raises(data.DataError):
        align.file_pairs([tmp_path / "missing.tsv"])


def test_bad_languages(data_dir):
    with pytest.raises(XltError, match="eng_Latn"):
        align.main(["--data_dir", str(data_dir), "--align_langs", "deu_Latn,eng_Latn"])
    with pytest.raises(XltError, match="--align_langs"):
        align.main(["--data_dir", str(data_dir), "--align_langs", "zzz_Latn"])
    with pytest.raises(XltError, match="--langs"):
        align.main(["--data_dir", str(data_dir), "--langs", "zzz_Latn"])
    with pytest.raises(XltError, match="exclude each other"):
        align.main(["--data_dir", str(data_dir), "--align_data", "pud", "--parallel", "x.tsv"])


# ---------------------------------------------------------------------------------------------------- end to end

SCHEMA = {"script", "paper", "command", "config", "seeds", "results", "mean", "std", "comparisons", "units", "hardware",
          "seconds", "details"}


def test_end_to_end_tiny(tiny_checkpoint, data_dir, tmp_path, device):
    ckpt = tiny_checkpoint()
    out = tmp_path / "out"
    result = align.main(["--model", str(ckpt), "--data_dir", str(data_dir), "--out_dir", str(out),
                         "--device", device, "--align_langs", "deu_Latn,fra_Latn", "--align_steps", "4",
                         "--align_batch_size", "8", "--queue_size", "16", "--epochs", "1", "--batch_size", "32",
                         "--lr", "1e-3", "--langs", "eng_Latn,deu_Latn", "--eval_limit", "30", "--limit", "96",
                         "--max_len", "64", "--log_every", "2"])
    res = json.loads((out / "results.json").read_text())
    assert set(res) == SCHEMA and res["script"] == "align.py" and res["seeds"] == [0]
    runs = {"unaligned", "unaligned + code-switch p=0.5", "aligned", "aligned + code-switch p=0.5"}
    assert set(res["results"]["0"]) == runs | {"tatoeba before", "tatoeba after"}
    assert all(set(res["results"]["0"][r]) == {"eng_Latn", "deu_Latn", "avg", "zero-shot avg", "transfer gap"}
               for r in runs)
    row = res["results"]["0"]["aligned"]
    assert row["transfer gap"] == pytest.approx(row["eng_Latn"] - row["deu_Latn"])
    assert res["details"]["sib200_overlap"] == {"train": 0, "dev": 0, "test": 0}       # UD PUD by default
    assert res["details"]["pairs"] == 2000 and res["details"]["data"].startswith("UD PUD")
    # the aligned languages, by FLORES code
    assert set(res["results"]["0"]["tatoeba after"]) == {"deu_Latn", "fra_Latn", "avg"}
    seed = res["details"]["seed 0"]
    assert len(seed["tatoeba per layer"]["before"]["deu"]) == 3 and seed["tatoeba pairs"] == {"deu": 30, "fra": 30}
    assert [r["step"] for r in seed["alignment"]["log"]] == [2, 4]
    assert seed["finetune"]["unaligned"]["switched"] == [0.0]
    assert 0.3 < seed["finetune"]["aligned + code-switch p=0.5"]["switched"][0] < 0.7
    assert res["config"]["align_steps"] == 4 and res["seconds"] > 0 and res["hardware"]
    md = (out / "results.md").read_text()
    assert "| hidden state |" in md
    # paired bootstrap CIs: aligned (and + code-switching) minus unaligned, zero-shot; Tatoeba after minus before
    cs = "aligned + code-switch p=0.5"
    assert [(c["method"], c["baseline"], c["test"], c["sentences"]) for c in res["comparisons"]] == [
        ("aligned", "unaligned", "zero-shot avg", 30), (cs, "unaligned", "zero-shot avg", 30),
        ("tatoeba after", "tatoeba before", "avg", 60)]
    for c in res["comparisons"]:
        mean = res["mean"]
        assert c["difference"] == pytest.approx(mean[c["method"]][c["test"]] - mean[c["baseline"]][c["test"]])
        assert c["low"] <= c["difference"] <= c["high"] and c["seeds"] == [0]
        assert f"| {c['method']} | {c['baseline']} | {c['test']} | {c['difference']:+.1f} |" in md
    assert (out / "aligned" / "config.json").exists() and (out / "aligned" / "model.safetensors").exists()
    assert Encoder.from_pretrained(out / "aligned").config.hidden_size == 32
    for slug in ("unaligned", "unaligned_cs", "aligned_finetuned", "aligned_cs"):
        cfg = json.loads((out / slug / "config.json").read_text())
        assert cfg["xlt_head"]["num_labels"] == len(data.SIB200_LABELS) and "xlt_align" in cfg
    assert result["results"]["0"]["aligned"]["eng_Latn"] >= 0
