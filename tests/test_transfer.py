"""Tests of transfer.py (RAMEN): IBM Model 1 and the symmetrisation by hand and on a synthetic bitext, the
initialisation formula, the foreign vocabulary's special ids, Stage A's frozen encoder, the embedding
swap, the corpus filter, and end-to-end runs on tiny checkpoints (one language; two languages x two seeds).

Run: XLT_DATA=/work/shared/data OMP_NUM_THREADS=1 python -m pytest -q tests/test_transfer.py
"""
import argparse
import json

import numpy as np
import pytest
import torch

import data
import evaluate
import model
import transfer
from data import DataError
from model import XltError


# ----------------------------------------------------------------------------------------------------
# IBM Model 1, symmetrisation, p(e | f)
# ----------------------------------------------------------------------------------------------------

def table_dict(table):
    src, tgt, prob = table
    return {(int(s), int(t)): float(p) for s, t, p in zip(src, tgt, prob)}


def test_ibm1_one_em_step_by_hand():
    # English ids: the=0 house=1 book=2 a=3; foreign ids: das=0 haus=1 buch=2 ein=3.
    english = [[0, 1], [0, 2], [3, 2]]
    foreign = [[0, 1], [0, 2], [3, 2]]
    table, _ = transfer.ibm1(english, foreign, iterations=1)
    t = table_dict(table)
    # From uniform t, every foreign token spreads 1/3 over NULL + the two English tokens of its sentence:
    # c(the, das) = 2/3, c(the, haus) = c(the, buch) = 1/3, so t(das | the) = (2/3) / (4/3) = 0.5.
    assert t[(0, 0)] == pytest.approx(0.5)
    assert t[(0, 1)] == pytest.approx(0.25)
    assert t[(2, 2)] == pytest.approx(0.5)          # t(buch | book)
    # NULL (-1) co-occurs with everything: c = das 2/3, haus 1/3, buch 2/3, ein 1/3 -> total 2.
    assert t[(-1, 0)] == pytest.approx(1 / 3)
    assert t[(-1, 3)] == pytest.approx(1 / 6)
    # t(. | e) is a distribution for every source token
    for e in (-1, 0, 1, 2, 3):
        assert sum(p for (s, _), p in t.items() if s == e) == pytest.approx(1.0)


def synthetic_bitext(n_sent=300, n_words=30, seed=0):
    """English sentences of random words plus word 0, a function word like 'the', once or (half of the
    time) twice in every sentence; the foreign side is the word-by-word translation through a random
    one-to-one dictionary, shuffled (so position carries no information)."""
    rng = np.random.default_rng(seed)
    dictionary = rng.permutation(n_words) + 100          # foreign ids 100.. differ from English ids
    english, foreign = [], []
    for _ in range(n_sent):
        e = np.concatenate([[0] * rng.integers(1, 3), 1 + rng.choice(n_words - 1, size=rng.integers(2, 6),
                                                                      replace=False)])
        english.append(e.tolist())
        foreign.append(dictionary[e[rng.permutation(len(e))]].tolist())
    return english, foreign, dictionary


def best_translations(table):
    """{English id: the foreign id with the highest t(f | e)}."""
    rows = {}
    for (e, f), p in table_dict(table).items():
        rows.setdefault(e, {})[f] = p
    return {e: max(row, key=row.get) for e, row in rows.items()}


def test_ibm1_recovers_the_dictionary_of_a_synthetic_bitext():
    english, foreign, dictionary = synthetic_bitext()
    table, links = transfer.ibm1(english, foreign, iterations=5)
    best = best_translations(table)
    assert all(best[e] == f for e, f in enumerate(dictionary))
    t = table_dict(table)
    assert min(t[(e, int(f))] for e, f in enumerate(dictionary)) > 0.8
    # Viterbi links: every foreign token linked to an English token that it translates
    right = sum(dictionary[e[i]] == f[j] for e, f, a in zip(english, foreign, links) for i, j in a)
    assert right / sum(map(len, foreign)) > 0.98


def test_one_em_step_is_only_co_occurrence_and_fails():
    # After one step from uniform, t(f | e) is proportional to co-occurrence counts, so every English
    # word's best "translation" is the foreign function word, which is in every sentence. Further EM
    # steps explain that word by English word 0 and free the others: why IBM1 needs its iterations.
    english, foreign, dictionary = synthetic_bitext()
    best = best_translations(transfer.ibm1(english, foreign, iterations=1)[0])
    assert sum(best[e] == f for e, f in enumerate(dictionary)) < len(dictionary) // 2
    assert sum(best[e] == dictionary[0] for e in range(len(dictionary))) > len(dictionary) // 2


def test_grow_diag_final_and_by_hand():
    e2f, f2e = {(0, 0), (1, 1), (2, 1)}, {(0, 0), (1, 1), (2, 2)}
    # intersection {(0,0),(1,1)}; (2,1) is a neighbour of (1,1) with English word 2 unaligned -> added;
    # then (2,2) is a diagonal neighbour of (1,1) whose foreign word 2 is unaligned -> added.
    assert transfer.grow_diag_final_and(e2f, f2e) == {(0, 0), (1, 1), (2, 1), (2, 2)}
    # final-and: a union link far from the rest is added only if both its words are unaligned
    assert transfer.grow_diag_final_and({(0, 0), (3, 3), (0, 5)}, {(0, 0)}) == {(0, 0), (3, 3)}


def test_grow_diag_final_and_updates_during_the_scan_as_atools():
    # The smallest case where growing from a snapshot of the links differs: intersection {(2,2)}; the scan meets
    # (1,1) first (diagonal neighbour of (2,2), e word 1 unaligned) and adds it; then (1,2) joins two aligned words.
    assert transfer.grow_diag_final_and({(1, 2), (2, 2)}, {(1, 1), (2, 2)}) == {(1, 1), (2, 2)}
    # a link added early in a scan is a neighbour for the rest of it: (1,1) then (2,2) grow from (0,0) in one scan
    assert transfer.grow_diag_final_and({(0, 0), (1, 1), (2, 2)}, {(0, 0)}) == {(0, 0), (1, 1), (2, 2)}
    # (e, f) order decides: (0,1) and (1,0) come first and align words 0 and 1 on both sides, so (1,1) is left out
    assert transfer.grow_diag_final_and({(0, 0), (0, 1), (1, 0), (1, 1)}, {(0, 0)}) == {(0, 0), (0, 1), (1, 0)}
    # final-and: e2f is scanned before f2e; (3,4) from e2f takes e word 3 before f2e's (3,3) can
    assert transfer.grow_diag_final_and({(0, 0), (3, 4)}, {(0, 0), (3, 3)}) == {(0, 0), (3, 4)}
    assert transfer.grow_diag_final_and({(0, 0), (3, 3)}, {(0, 0), (3, 4)}) == {(0, 0), (3, 3)}


def atools_grow_diag_final_and(a_links, b_links):
    """The oracle: a line-by-line transliteration of `atools -i A -j B -c grow-diag-final-and` (clab/fast_align
    src/atools.cc: ReadPharaohAlignmentGrid's grids, Safe, RefineCommand::InitRefine, Grow, GDFACommand::Apply),
    kept independent of transfer.py: boolean grids, the candidate set p erased after each pass."""
    def grid(links):                                   # Array2D(max_x + 1, max_y + 1), an empty line gives 1 x 1
        width, height = (max((x[k] for x in links), default=0) + 1 for k in (0, 1))
        g = [[False] * height for _ in range(width)]
        for i, j in links:
            g[i][j] = True
        return g
    a, b = grid(a_links), grid(b_links)
    W, H = max(len(a), len(b)), max(len(a[0]), len(b[0]))

    def safe(g, i, j):
        return 0 <= i < len(g) and 0 <= j < len(g[0]) and g[i][j]
    res, is_i, is_j = [[False] * H for _ in range(W)], [False] * W, [False] * H

    def align(i, j):
        res[i][j] = is_i[i] = is_j[j] = True
    un = [[safe(a, i, j) or safe(b, i, j) for j in range(H)] for i in range(W)]
    for i in range(W):
        for j in range(H):
            if safe(a, i, j) and safe(b, i, j):
                align(i, j)
    neighbors = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]

    def koehn_aligned(i, j):                           # IsOneOrBothUnaligned && IsNeighborAligned
        return not (is_i[i] and is_j[j]) and any(safe(res, i + di, j + dj) for di, dj in neighbors)
    p = [(i, j) for i in range(W) for j in range(H) if un[i][j] and not res[i][j]]     # std::set: (i, j) order
    keep_going = bool(p)
    while keep_going:
        keep_going, added = False, []
        for i, j in p:
            if koehn_aligned(i, j):
                align(i, j)
                added.append((i, j))
                keep_going = True
        p = [x for x in p if x not in added]
    for adds in (a, b):                                # Grow(IsNeitherAligned, idempotent=true, a) then b
        for i in range(len(adds)):
            for j in range(len(adds[0])):
                if adds[i][j] and not res[i][j] and not (is_i[i] or is_j[j]):
                    align(i, j)
    return {(i, j) for i in range(W) for j in range(H) if res[i][j]}


def test_grow_diag_final_and_matches_a_transliteration_of_atools():
    rng = np.random.default_rng(0)
    for n in range(400):
        m, k = rng.integers(1, 9, size=2)
        if n % 2:                                      # as the aligners give: one link (or none) per target word
            e2f = {(int(rng.integers(m)), j) for j in range(k) if rng.random() < 0.8}
            f2e = {(i, int(rng.integers(k))) for i in range(m) if rng.random() < 0.8}
        else:                                          # any sets of links
            e2f, f2e = ({(i, j) for i in range(m) for j in range(k) if rng.random() < 0.3} for _ in range(2))
        assert transfer.grow_diag_final_and(set(e2f), set(f2e)) == atools_grow_diag_final_and(e2f, f2e), (e2f, f2e)
    assert atools_grow_diag_final_and({(1, 2), (2, 2)}, {(1, 1), (2, 2)}) == {(1, 1), (2, 2)}   # the oracle agrees


def test_translation_probs_are_normalised_link_counts():
    english, foreign, dictionary = synthetic_bitext()
    (f_idx, e_idx, p), stats = transfer.translation_probs(english, foreign, iterations=5)
    sums = torch.zeros(200).index_add_(0, f_idx, p)
    assert torch.allclose(sums[torch.unique(f_idx)], torch.ones(len(torch.unique(f_idx))))
    for e, f in enumerate(dictionary):
        row = f_idx == int(f)
        assert int(e_idx[row][p[row].argmax()]) == e and float(p[row].max()) > 0.9
    assert stats["links"] >= sum(map(len, english)) * 0.98


# ----------------------------------------------------------------------------------------------------
# Initialisation, vocabulary, swap, stages
# ----------------------------------------------------------------------------------------------------

def test_ramen_init_is_the_weighted_average_and_copies_specials():
    g = torch.Generator().manual_seed(0)
    E_e, b_e = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
    probs = (torch.tensor([5, 5, 6, 2]), torch.tensor([2, 7, 3, 9]), torch.tensor([0.25, 0.75, 1.0, 1.0]))
    specials = [(0, 0), (1, 3), (2, 8)]                # foreign 2: a special token with a translation (a linked [UNK])
    E_f, b_f = transfer.ramen_init(E_e, b_e, probs, specials, 8, torch.Generator().manual_seed(1))
    assert torch.allclose(E_f[5], 0.25 * E_e[2] + 0.75 * E_e[7])
    assert torch.allclose(b_f[5], 0.25 * b_e[2] + 0.75 * b_e[7])
    assert torch.equal(E_f[6], E_e[3]) and torch.equal(b_f[6], b_e[3])
    assert torch.equal(E_f[0], E_e[0]) and torch.equal(E_f[1], E_e[3]) and b_f[1] == b_e[3]
    # RAMEN's init_weight.py copies the specials first, so a translation wins over the English special row
    assert torch.equal(E_f[2], E_e[9]) and b_f[2] == b_e[9]
    uncovered = [3, 4, 7]
    assert (E_f[uncovered].abs() > 0).all() and (b_f[uncovered] == 0).all()
    # the random baseline draws the same random rows; only the translated rows differ
    R_f, r_b = transfer.ramen_init(E_e, b_e, None, specials, 8, torch.Generator().manual_seed(1))
    assert torch.equal(R_f[uncovered], E_f[uncovered]) and torch.equal(R_f[1], E_e[3]) and torch.equal(R_f[2], E_e[8])
    assert not torch.allclose(R_f[5], E_f[5]) and r_b[5] == 0
    # the random rows are N(0, 1/H), as in RAMEN's init_weight.py
    big, _ = transfer.ramen_init(torch.zeros(1, 256), torch.zeros(1), None, [], 400, torch.Generator().manual_seed(2))
    assert big.std().item() == pytest.approx(256 ** -0.5, rel=0.05)


def test_foreign_vocabulary_keeps_english_special_ids():
    eng = data.load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    words = [a + b + c for a in "abcdefghij" for b in "klmnopqrst" for c in "uvwxyz"]   # > 104 pieces
    texts = ["Die Straße ist lang und schön.", "Wir gehen über die Brücke.", "Äpfel und Birnen."] * 20 + \
        [" ".join(words[i:i + 10]) for i in range(0, len(words), 10)] * 3
    tok = transfer.train_foreign_tokenizer(texts, 300, eng)
    assert tok.get_vocab_size() == 300
    assert data.special_ids(tok) == data.special_ids(eng) == {"cls": 101, "sep": 102, "pad": 0, "mask": 103,
                                                                "unk": 100}
    enc = tok.encode("Die STRASSE über Äpfel")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "über" in enc.tokens and "äpfel" in enc.tokens          # lower-cased like MiniLM, accents kept
    assert len(set(tok.get_vocab().values())) == tok.get_vocab_size()   # every id used exactly once


def test_foreign_vocabulary_moves_specials_whose_english_id_is_too_large(tmp_path):
    # an English vocabulary whose [MASK] is its last id, 500 (XLM-R's <mask> is 250001)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(496)] + ["[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    eng = data.wordpiece_tokenizer(tmp_path / "vocab.txt", lowercase=True)
    tok = transfer.train_foreign_tokenizer(["ein kleiner Test", "noch ein Test"] * 10, 60, eng)
    sp = data.special_ids(tok)
    assert (sp["pad"], sp["unk"], sp["cls"], sp["sep"]) == (0, 1, 2, 3)
    assert sp["mask"] == tok.get_vocab_size() - 1
    e, f = data.special_ids(eng), data.special_ids(tok)
    assert (tok.get_vocab_size() - 1, 500) in [(f[r], e[r]) for r in e]          # the specials RAMEN copies across


def test_a_vocab_size_below_the_alphabet_is_said(tmp_path, capsys):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(50)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    eng = data.wordpiece_tokenizer(tmp_path / "vocab.txt", lowercase=True)
    tok = transfer.train_foreign_tokenizer(["ein kleiner Test", "noch ein Test"] * 10, 5, eng)
    assert tok.get_vocab_size() > 5
    need = tok.get_vocab_size()
    assert f"--vocab_size 5: the foreign text's characters alone need {need} ids" in capsys.readouterr().out


def tiny_setup(tiny_checkpoint, seed=0):
    path = tiny_checkpoint()
    enc = model.Encoder.from_pretrained(path, mlm_head=True, verbose=False)
    tok = data.load_tokenizer(path)
    vocab_e = transfer.Vocab.of(enc)
    texts = ["the cat is on the mat .", "he was not in the city .", "der hund ist nicht da ."] * 10
    E_f, b_f = transfer.ramen_init(enc.embed.word.weight, enc.mlm.bias, None, [(i, i) for i in data.special_ids(tok).values()],
                                   tok.get_vocab_size() + 7, torch.Generator().manual_seed(seed))
    vocab_f = transfer.Vocab.new(E_f, b_f)
    examples = data.encode(tok, texts, 32)
    return enc, tok, vocab_e, vocab_f, examples


def args_for_stages(**kw):
    a = dict(stage_a_steps=3, stage_a_lr=1e-2, stage_b_steps=3, stage_b_lr=1e-2, weight_decay=0.01, warmup=0.0,
             log_every=100)
    a.update(kw)
    return argparse.Namespace(**a)


def shared_tensors(enc):
    """Every tensor of the encoder that is not a language's own (word embeddings, MLM output bias)."""
    return {k: v.detach().clone() for k, v in enc.state_dict().items() if k not in ("embed.word.weight", "mlm.bias")}


def test_stage_a_leaves_every_encoder_parameter_bit_identical(tiny_checkpoint):
    enc, tok, vocab_e, vocab_f, examples = tiny_setup(tiny_checkpoint)
    before = shared_tensors(enc)
    e_before = vocab_e.word.weight.detach().clone()
    f_before = (vocab_f.word.weight.detach().clone(), vocab_f.bias.detach().clone())
    losses = transfer.stage_a(enc, vocab_e, vocab_f, transfer.mlm_batches(examples, tok, 8, 0),
                              args_for_stages(), torch.device("cpu"))
    assert len(losses) == 1 and np.isfinite(losses[0])
    after = shared_tensors(enc)
    assert after.keys() == before.keys() and len(before) > 10
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(vocab_e.word.weight, e_before)
    assert not torch.equal(vocab_f.word.weight, f_before[0])          # ... while the foreign tensors learn
    assert not torch.equal(vocab_f.bias, f_before[1])
    # Stage B, by contrast, trains the shared encoder
    transfer.stage_b(enc, vocab_e, vocab_f, transfer.mlm_batches(examples, tok, 8, 1),
                     transfer.mlm_batches(examples, tok, 8, 0), args_for_stages(), torch.device("cpu"))
    assert not torch.equal(shared_tensors(enc)["layers.0.qkv.weight"], before["layers.0.qkv.weight"])


def test_swapping_embeddings_leaves_the_encoder_untouched(tiny_checkpoint):
    enc, tok, vocab_e, vocab_f, examples = tiny_setup(tiny_checkpoint)
    enc.eval()
    batch = data.pad_batch(examples[:4], 0)
    with torch.no_grad():
        h_e = enc(batch["input_ids"], batch["attention_mask"])
    before = shared_tensors(enc)
    ptrs = {k: v.data_ptr() for k, v in enc.state_dict().items() if k not in ("embed.word.weight", "mlm.bias")}
    transfer.use_vocab(enc, vocab_f)
    assert enc.embed.word is vocab_f.word and enc.mlm.bias is vocab_f.bias
    assert enc.config.vocab_size == vocab_f.word.num_embeddings == tok.get_vocab_size() + 7
    with torch.no_grad():
        h_f = enc(batch["input_ids"], batch["attention_mask"])
        logits = enc.mlm_logits(h_f)
    # the tied decoder is the foreign matrix now
    manual = torch.nn.functional.linear(enc.mlm.norm(torch.nn.functional.gelu(enc.mlm.dense(h_f))),
                                        vocab_f.word.weight, vocab_f.bias)
    assert logits.shape[-1] == vocab_f.word.num_embeddings and torch.allclose(logits, manual)
    assert not torch.allclose(h_f, h_e)
    transfer.use_vocab(enc, vocab_e)
    with torch.no_grad():
        assert torch.equal(enc(batch["input_ids"], batch["attention_mask"]), h_e)
    after = shared_tensors(enc)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v.data_ptr() for k, v in enc.state_dict().items() if k in ptrs} == ptrs   # the same tensors


def test_mlm_batches_mask_only_real_tokens(tiny_checkpoint):
    enc, tok, _, _, examples = tiny_setup(tiny_checkpoint)
    b = next(transfer.mlm_batches(examples, tok, 8, 0))
    flat_mask = b["attention_mask"].view(-1)
    assert (flat_mask[b["positions"]] == 1).all()
    sp = set(data.special_ids(tok).values())
    assert not any(int(t) in sp for t in b["targets"])
    loss, _ = model.mlm_loss(enc, b)
    assert loss.item() == pytest.approx(np.log(tok.get_vocab_size()), rel=0.3)   # random head: ~uniform


# ----------------------------------------------------------------------------------------------------
# Corpora, errors, end to end
# ----------------------------------------------------------------------------------------------------

def test_corpora_never_contain_scored_test_sentences(data_dir, tmp_path):
    test_de = data.read_sib200(data_dir, "deu_Latn", "test")[0]["text"]
    test_en = data.read_sib200(data_dir, "eng_Latn", "test")[0]["text"]
    par = tmp_path / "par.tsv"
    par.write_text(f"Hello there.\tHallo.\n{test_en}\tirgendwas\nsomething\t{test_de}\nThanks.\tDanke.\n")
    args = argparse.Namespace(parallel=str(par), mono=None, data_dir=str(data_dir), limit=None, no_sib_bitext=False)
    bitext, foreign, english, _ = transfer.corpora(args, "deu_Latn")
    assert bitext == [("Hello there.", "Hallo."), ("Thanks.", "Danke.")]
    assert test_de not in foreign and test_en not in english
    assert english[:2] == ["Hello there.", "Thanks."] and "Hallo." not in english     # the bitext's English side
    # --mono text: stripped, blank lines dropped, scored sentences removed; the bitext's foreign side first
    mono = tmp_path / "mono.txt"
    mono.write_text(f"  Guten Tag.  \n\n{test_de}\nDanke.\n")
    args.mono = str(mono)
    assert transfer.corpora(args, "deu_Latn")[1] == ["Hallo.", "Danke.", "Guten Tag."]
    args.mono = None
    # the built-in corpora for German: SIB-200 train+dev, Tatoeba and PUD
    args.parallel = None
    bitext, foreign, english, sources = transfer.corpora(args, "deu_Latn")
    assert len(sources) == 3 and len(bitext) > 2500 and all(sources.values())
    scored = {r["text"] for r in data.read_sib200(data_dir, "deu_Latn", "test")}
    assert not scored & set(foreign)
    # --no_sib_bitext: no SIB-200 sentence of any split on either side, every other pair kept
    args.no_sib_bitext = True
    no_sib, foreign_no_sib, _, sources_no_sib = transfer.corpora(args, "deu_Latn")
    sib = {r["text"] for x in ("eng_Latn", "deu_Latn") for split in ("train", "dev", "test")
           for r in data.read_sib200(data_dir, x, split)}
    assert set(sources_no_sib) == set(sources) - {"SIB-200 train+dev (index_id)"}
    assert not sib & {x for pair in no_sib for x in pair} and not sib & set(foreign_no_sib)
    assert set(no_sib) == {pair for pair in bitext if not sib & set(pair)}
    assert len(bitext) - len(no_sib) >= sources["SIB-200 train+dev (index_id)"] > 700
    args.no_sib_bitext = False
    # --limit: evenly spaced pairs (data.subset), not the first ones (SIB-200 train+dev come first)
    args.limit = 10
    assert transfer.corpora(args, "deu_Latn")[0] == data.subset(bitext, 10)


def test_last_quarter_drop():
    assert transfer.last_quarter_drop([5.0, 4.0, 2.0]) is None                     # too short to say
    assert transfer.last_quarter_drop([9.0, 6.0, 4.0, 2.0, 2.0]) == 0.0             # flat at the end: levelled off
    assert transfer.last_quarter_drop([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]) == 50.0   # 4 -> 2 over the last 2 steps


def test_bad_input_gives_one_line_errors(data_dir, tmp_path):
    with pytest.raises(XltError, match="--langs: sib200 has no language xyz_Latn"):
        transfer.main(["--langs", "xyz_Latn", "--data_dir", str(data_dir)])
    with pytest.raises(XltError, match="foreign language"):
        transfer.main(["--langs", "eng_Latn", "--data_dir", str(data_dir)])
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one column\n")
    with pytest.raises(DataError, match="bad.tsv line 1"):
        transfer.main(["--parallel", str(bad), "--data_dir", str(data_dir)])
    with pytest.raises(XltError, match="--parallel/--mono hold one language"):
        transfer.main(["--parallel", str(bad), "--langs", "deu_Latn,fra_Latn", "--data_dir", str(data_dir)])
    with pytest.raises(SystemExit):                                       # argparse: a range, not a block of ifs
        transfer.main(["--vocab_size", "0", "--data_dir", str(data_dir)])
    with pytest.raises(XltError, match="--no_sib_bitext .* --parallel replaces"):
        transfer.main(["--parallel", str(bad), "--no_sib_bitext", "--data_dir", str(data_dir)])


SCHEMA = {"script", "paper", "command", "config", "seeds", "results", "mean", "std", "comparisons", "units", "hardware",
          "seconds", "details"}


def test_end_to_end_on_tiny_models(data_dir, tiny_checkpoint, tmp_path):
    eng = tiny_checkpoint("eng", mlm_head=False)         # no MLM head: exercises Stage 0 as for MiniLM
    ref = tiny_checkpoint("ref", seed=1, mlm_head=False)
    out = tmp_path / "out"
    res = transfer.main(["--model", str(eng), "--reference", str(ref), "--out_dir", str(out), "--data_dir",
                         str(data_dir), "--langs", "fra_Latn", "--vocab_size", "300", "--mlm_head_steps", "2",
                         "--stage_a_steps", "3", "--stage_b_steps", "2", "--epochs", "1", "--limit", "150",
                         "--eval_limit", "60", "--batch_size", "16", "--random_stage_a_steps", "4", "--log_every", "1"])
    assert set(json.loads((out / "results.json").read_text())) == SCHEMA and (out / "results.md").is_file()
    scores = res["results"]["0"]
    rows = ["RAMEN init", "random init", "English model, no transfer", f"{ref} (reference)"]
    assert list(scores) == rows and all(set(r) == {"eng_Latn", "fra_Latn", "avg", "zero-shot avg"}
                                        for r in scores.values())
    assert res["config"]["langs"] == "fra_Latn" and res["seconds"] > 0 and res["script"] == "transfer.py"
    run = res["details"]["runs"]["fra_Latn, seed 0"]
    assert set(run) >= {"stage_0", "ramen", "random"} and run["stage_0"]["steps"] == 2
    assert len(run["ramen"]["stage_a"]) == 3 and run["ramen fine-tune"]["eng_Latn"] == scores["RAMEN init"]["eng_Latn"]
    assert len(run["random"]["stage_a"]) == 4 and len(run["random"]["stage_b"]) == 2     # --random_stage_a_steps
    drop = run["random"]["last_quarter_drop_%"]
    assert drop == {"stage_a": transfer.last_quarter_drop(run["random"]["stage_a"]), "stage_b": None}
    assert drop["stage_a"] is not None and res["details"]["corpora"]["fra_Latn"]["sib200_in_bitext"]
    assert res["details"]["alignment"]["fra_Latn"]["covered"] > 0
    corpora = res["details"]["corpora"]["fra_Latn"]
    assert corpora["bitext_pairs"] == 150
    # the saved foreign model: our encoder with the foreign vocabulary, loadable by model.py / data.py
    fx = model.Encoder.from_pretrained(out / "fra_Latn", mlm_head=True, verbose=False)
    fx_tok = data.load_tokenizer(out / "fra_Latn")
    assert fx.config.vocab_size == fx_tok.get_vocab_size() == corpora["foreign_vocab_size"]
    # the saved classifier reproduces the zero-shot score of the table
    enc, head, cfg = model.load_with_head(out / "fra_Latn-classifier")
    tok = data.load_tokenizer(out / "fra_Latn-classifier")
    acc = evaluate.sib200_scores(enc, head, tok, data_dir, ["fra_Latn"], torch.device("cpu"), limit=60)["fra_Latn"]
    assert acc == pytest.approx(scores["RAMEN init"]["fra_Latn"])
    assert cfg["xlt_transfer"]["lang"] == "fra_Latn"
    # paired bootstrap CIs: RAMEN init minus random init, and minus the English model (no transfer)
    md = (out / "results.md").read_text()
    assert [(c["method"], c["baseline"], c["test"]) for c in res["comparisons"]] == [
        ("RAMEN init", "random init", "fra_Latn"), ("RAMEN init", "English model, no transfer", "fra_Latn")]
    for c in res["comparisons"]:
        assert c["difference"] == pytest.approx(scores[c["method"]]["fra_Latn"] - scores[c["baseline"]]["fra_Latn"])
        assert c["low"] <= c["difference"] <= c["high"] and c["sentences"] == 60
        assert f"| {c['method']} | {c['baseline']} | fra_Latn | {c['difference']:+.1f} |" in md


def test_two_languages_and_two_seeds(data_dir, tiny_checkpoint, tmp_path):
    eng = tiny_checkpoint("eng")                         # with an MLM head: no Stage 0
    out = tmp_path / "out"
    res = transfer.main(["--model", str(eng), "--reference", str(eng), "--out_dir", str(out), "--data_dir",
                         str(data_dir), "--langs", "fra_Latn,deu_Latn", "--seeds", "0", "1", "--vocab_size", "200",
                         "--stage_a_steps", "1", "--stage_b_steps", "1", "--epochs", "1", "--limit", "40",
                         "--eval_limit", "20", "--batch_size", "16", "--no_save"])
    assert not any(out.glob("*_Latn*")) and res["seeds"] == [0, 1]
    for seed in ("0", "1"):
        runs = res["details"]["runs"]
        assert "stage_0" not in runs[f"fra_Latn, seed {seed}"]
        row = res["results"][seed]["RAMEN init"]
        assert list(row) == ["eng_Latn", "fra_Latn", "deu_Latn", "avg", "zero-shot avg"]
        english = [runs[f"{lang}, seed {seed}"]["ramen fine-tune"]["eng_Latn"] for lang in ("fra_Latn", "deu_Latn")]
        assert row["eng_Latn"] == pytest.approx(sum(english) / 2)      # the mean over the per-language models
    assert res["std"]["RAMEN init"]["fra_Latn"] is not None and "±" in (out / "results.md").read_text()
    assert [(c["baseline"], c["test"], c["seeds"], c["sentences"]) for c in res["comparisons"]] == [
        (b, t, [0, 1], n) for b in ("random init", "English model, no transfer")
        for t, n in (("fra_Latn", 20), ("deu_Latn", 20), ("zero-shot avg", 40))]
