"""Tests of continual.py: the A-GEM projection (closed form, when it acts, what it touches), freezing, the
memory's masked-LM batches and restricted softmax, the MLM head fitting + cache, and an end-to-end run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import continual
import data
import model

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# the projection on vectors
# ----------------------------------------------------------------------------------------------------

def test_project_leaves_g_unchanged_without_conflict():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g, r = torch.randn(500, generator=gen), torch.randn(500, generator=gen)
        if torch.dot(g, r) < 0:
            r = -r
        out, conflict = continual.project(g, r)
        assert torch.equal(out, g) and not conflict
    g = torch.tensor([1.0, 0.0, 2.0])                        # orthogonal: g . g_ref = 0 is no conflict
    out, conflict = continual.project(g, torch.tensor([0.0, 5.0, 0.0]))
    assert torch.equal(out, g) and not conflict


def test_project_removes_the_conflict_and_matches_the_closed_form():
    rng = np.random.default_rng(1)
    n_conflicts = 0
    for _ in range(50):
        g, r = rng.normal(size=300), rng.normal(size=300) * rng.uniform(0.01, 10)
        out, conflict = continual.project(torch.tensor(g, dtype=torch.float32), torch.tensor(r, dtype=torch.float32))
        dot = g @ r
        expected = g - dot / (r @ r) * r if dot < 0 else g       # the closed form, in float64
        assert bool(conflict) == (dot < 0)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
        assert float(torch.dot(out.double(), torch.tensor(r))) >= -1e-6 * np.linalg.norm(g) * np.linalg.norm(r)
        n_conflicts += dot < 0
    assert 10 < n_conflicts < 40                                 # both branches were exercised
    # by hand: g = (1, -1), g_ref = (0, 1): g . g_ref = -1, so g <- g - (-1 / 1) (0, 1) = (1, 0)
    out, conflict = continual.project(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]))
    assert conflict and torch.allclose(out, torch.tensor([1.0, 0.0]))


def test_project_by_hand():
    # g = (3, -1, 2), g_ref = (1, 2, -2): g . g_ref = -3, g_ref . g_ref = 9, g <- g + (1/3) g_ref = (10/3, -1/3, 4/3)
    out, conflict = continual.project(torch.tensor([3.0, -1.0, 2.0]), torch.tensor([1.0, 2.0, -2.0]))
    assert conflict and torch.allclose(out, torch.tensor([10 / 3, -1 / 3, 4 / 3]))


def test_project_is_exact_for_a_tiny_g_ref():
    # g_ref . g_ref = 2e-24, and 2e-60 (below fp32's smallest number): the conflict is still removed exactly
    for tiny in (1e-12, 1e-30):
        g, r = torch.tensor([1.0, -3.0]), torch.tensor([tiny, tiny])
        out, conflict = continual.project(g, r)
        assert conflict and torch.allclose(out, torch.tensor([2.0, -2.0]))     # g - (-2 / 2) (1, 1)
        assert float(F.cosine_similarity(out, r / tiny, dim=0)) == pytest.approx(0.0, abs=1e-6)
    out, conflict = continual.project(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1e-12]))
    assert conflict and torch.equal(out, torch.tensor([1.0, 0.0]))


def test_project_is_sync_free_and_leaves_g_alone_for_zero_g_ref():
    g = torch.tensor([1.0, -2.0, 0.5, -4.0])
    out, conflict = continual.project(g, torch.zeros(4))                # no constraint: g unchanged, no NaN
    assert torch.equal(out, g) and not conflict
    assert isinstance(conflict, torch.Tensor) and conflict.dim() == 0     # a tensor, never a Python bool


def test_flatten_and_write_grads_round_trip():
    a, b, c = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.arange(6.0).view(2, 3), torch.arange(4.0) + 10      # c has no gradient: zeros
    flat = continual.flatten_grads([a, b, c])
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 0]
    continual.write_grads([a, b, c], flat * 2)
    assert a.grad.tolist() == [[0, 2, 4], [6, 8, 10]] and b.grad.tolist() == [20, 22, 24, 26] and c.grad.tolist() == [0]
    with pytest.raises(ValueError):
        continual.write_grads([a, b], flat)
    assert a.grad.tolist() == [[0, 2, 4], [6, 8, 10]]             # a size mismatch writes nothing


# ----------------------------------------------------------------------------------------------------
# which parameters: shared, frozen, heads
# ----------------------------------------------------------------------------------------------------

def tiny_encoder(layers=4, seed=0, vocab=60):
    torch.manual_seed(seed)
    cfg = model.Config(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return model.Encoder(cfg, mlm_head=True)


def test_set_trainable_and_shared_parameters():
    enc = tiny_encoder()
    continual.set_trainable(enc, "naive")
    names, params = continual.shared_parameters(enc)
    assert "embed.word.weight" not in names and not any(n.startswith("mlm.") for n in names)
    assert {"embed.position.weight", "embed.norm.weight", "layers.0.qkv.weight", "layers.3.ffn_norm.bias"} <= set(names)
    assert len(params) == sum(1 for n, _ in enc.named_parameters() if n != "embed.word.weight" and not n.startswith("mlm."))
    continual.set_trainable(enc, "agem", train_embeddings=True)
    assert "embed.word.weight" in continual.shared_parameters(enc)[0]
    continual.set_trainable(enc, "freeze", freeze_layers=3)
    names, _ = continual.shared_parameters(enc)
    assert not any(n.startswith(("embed.", "layers.0.", "layers.1.", "layers.2.")) for n in names)
    assert names and all(n.startswith("layers.3.") for n in names)
    with pytest.raises(model.XltError):
        continual.set_trainable(enc, "freeze", freeze_layers=5)


def _agem_setup(method="agem", freeze_layers=2):
    enc, head = tiny_encoder(), model.TokenClassificationHead(16, 5, dropout=0.0)
    continual.set_trainable(enc, method, freeze_layers)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (3, 7), generator=g)
    mem_ids = torch.randint(5, 60, (2, 9), generator=g)
    positions = torch.tensor([1, 4, 12])
    mem = {"input_ids": mem_ids, "attention_mask": torch.ones_like(mem_ids), "token_type_ids": torch.zeros_like(mem_ids),
           "positions": positions, "targets": torch.tensor([3, 0, 7])}
    vocab = torch.arange(10, 30)

    def task_loss(detach_head=False):
        h = enc(ids, mask)
        logits = (F.linear(h, head.out.weight.detach(), head.out.bias.detach()) if detach_head else head(h))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def memory_loss():
        return model.mlm_loss(enc, mem, vocab)[0]
    return enc, head, task_loss, memory_loss


def test_agem_backward_projects_only_the_shared_parameters():
    enc, head, task_loss, memory_loss = _agem_setup()
    _, shared = continual.shared_parameters(enc)
    head_params = list(head.parameters())
    g_task = torch.autograd.grad(task_loss(), shared + head_params)
    g_ref = torch.autograd.grad(memory_loss(), shared, allow_unused=True)
    g = torch.cat([t.reshape(-1) for t in g_task[:len(shared)]])
    r = torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(g_ref, shared)])
    expected, _ = continual.project(g, r)

    _, conflict, cos = continual.agem_backward(task_loss(), memory_loss, shared)
    assert bool(conflict) == bool(torch.dot(g, r) < 0)
    assert math.isclose(float(cos), float(F.cosine_similarity(g, r, dim=0)), rel_tol=1e-4, abs_tol=1e-6)
    torch.testing.assert_close(continual.flatten_grads(shared), expected)
    for p, gt in zip(head_params, g_task[len(shared):]):        # the task head: its own task gradient, unprojected
        torch.testing.assert_close(p.grad, gt)
    assert enc.embed.word.weight.grad is None                   # frozen: untouched
    assert all(p.grad is None for p in enc.mlm.parameters())    # the previous task's head is frozen


def test_agem_backward_on_an_exact_conflict_zeroes_the_shared_step_only():
    # A "previous task" whose loss is minus the task loss through the encoder (head detached): g_ref = -g on the
    # shared parameters, so the projection removes all of g there, while the head keeps its whole gradient.
    enc, head, task_loss, _ = _agem_setup()
    _, shared = continual.shared_parameters(enc)
    head_grads = torch.autograd.grad(task_loss(), list(head.parameters()))
    _, conflict, cos = continual.agem_backward(task_loss(), lambda: -task_loss(detach_head=True), shared)
    assert conflict and math.isclose(float(cos), -1.0, abs_tol=1e-5)
    assert continual.flatten_grads(shared).abs().max() < 1e-6
    for p, gt in zip(head.parameters(), head_grads):
        torch.testing.assert_close(p.grad, gt)


def test_agem_backward_leaves_frozen_blocks_without_gradient():
    enc, head, task_loss, memory_loss = _agem_setup("freeze", freeze_layers=2)
    _, shared = continual.shared_parameters(enc)
    continual.agem_backward(task_loss(), memory_loss, shared)
    frozen = list(enc.embed.parameters()) + list(enc.layers[:2].parameters()) + list(enc.mlm.parameters())
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in enc.layers[2:].parameters())


# ----------------------------------------------------------------------------------------------------
# the memory and its masked LM
# ----------------------------------------------------------------------------------------------------

def test_restricted_softmax_is_a_slice_of_the_full_logits():
    enc = tiny_encoder()
    h = torch.randn(5, 16)
    vocab = torch.tensor([7, 3, 50, 11])
    torch.testing.assert_close(enc.mlm_logits(h, vocab), enc.mlm_logits(h)[:, vocab])


def test_memory_batches(tiny_checkpoint):
    tok = data.load_tokenizer(tiny_checkpoint())
    texts = ["the cat was on the mat and it is not new", "der hund ist nicht in der stadt", "le chat est la"]
    examples = data.encode(tok, texts, 32)
    vocab_size = tok.get_vocab_size()
    vocab = continual.mlm_vocab([examples], tok, vocab_size)
    sp = data.special_ids(tok)
    assert not set(vocab.tolist()) & set(sp.values())
    assert set(vocab.tolist()) == {i for e in examples for i in e["input_ids"]} - set(sp.values())
    mem = continual.Memory(examples, vocab, tok, vocab_size, batch_size=3, prob=0.5, seed=0)
    for _ in range(5):
        b = mem.batch()
        assert len(b["positions"]) == len(b["targets"]) > 0
        flat_mask = b["attention_mask"].view(-1)
        assert flat_mask[b["positions"]].all()                   # only real tokens are predicted
        assert set(vocab[b["targets"]].tolist()) <= set(vocab.tolist())
    b = mem.batch([0, 1, 2])
    orig = data.pad_batch(examples, sp["pad"])["input_ids"].view(-1)
    assert torch.equal(vocab[b["targets"]], orig[b["positions"]])       # targets are the original tokens
    assert (b["input_ids"].view(-1)[b["positions"]] == sp["mask"]).float().mean() > 0.5
    unmasked = torch.ones_like(orig, dtype=torch.bool)
    unmasked[b["positions"]] = False
    assert torch.equal(b["input_ids"].view(-1)[unmasked], orig[unmasked])
    small = continual.Memory(examples, vocab[:3], tok, vocab_size, batch_size=3, prob=0.9, seed=0)
    with pytest.raises(model.XltError, match="outside the restricted MLM vocabulary"):
        small.batch([0, 1, 2])


def test_fit_mlm_head_learns_caches_and_leaves_the_encoder_alone(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint(mlm_head=False)
    assert not model.Encoder.from_pretrained(path, mlm_head=True).checkpoint_has_mlm_head
    assert model.Encoder.from_pretrained(tiny_checkpoint("with_head", mlm_head=True)).checkpoint_has_mlm_head
    tok = data.load_tokenizer(path)
    enc = model.Encoder.from_pretrained(path, mlm_head=True)
    before = {k: v.clone() for k, v in enc.state_dict().items() if not k.startswith("mlm.")}
    examples = data.encode(tok, ["the first one was new", "le chat est la", "der hund ist nicht da", "it is a"] * 4, 32)
    vocab = continual.mlm_vocab([examples], tok, enc.config.vocab_size)
    mem = continual.Memory(examples, vocab, tok, enc.config.vocab_size, 8, 0.3, seed=0)
    args = continual.parse_args(["--model", str(path), "--out_dir", str(tmp_path / "out"), "--mlm_head_steps", "60",
                                 "--mlm_head_lr", "1e-2"])
    info = continual.mlm_head(enc, mem, args, 0, torch.device("cpu"))
    cache = Path(info["cache"])
    assert not info["loaded"] and cache.is_file() and "fitted" in capsys.readouterr().out
    assert info["loss"] < math.log(len(vocab)) - 0.3                # better than uniform over the vocabulary
    for k, v in enc.state_dict().items():
        if not k.startswith("mlm."):
            assert torch.equal(v, before[k]), k                      # the encoder is frozen while fitting
    assert all(not p.requires_grad for p in enc.parameters())
    fitted = {k: v.clone() for k, v in enc.mlm.state_dict().items()}
    enc2 = model.Encoder.from_pretrained(path, mlm_head=True)
    info2 = continual.mlm_head(enc2, mem, args, 0, torch.device("cpu"))
    assert info2["loaded"] and info2["cache"] == info["cache"] and "loaded" in capsys.readouterr().out
    for k, v in enc2.mlm.state_dict().items():
        assert torch.equal(v, fitted[k])
    assert continual.mlm_head(enc2, mem, args, 1, torch.device("cpu"))["cache"] != info["cache"]  # keyed by seed


# ----------------------------------------------------------------------------------------------------
# fine-tuning: freezing freezes, and each method changes what it should
# ----------------------------------------------------------------------------------------------------

SENTS = [{"words": "the cat was on the mat".split(), "upos": ["DET", "NOUN", "AUX", "ADP", "DET", "NOUN"]},
         {"words": "it is not new".split(), "upos": ["PRON", "AUX", "PART", "ADJ"]},
         {"words": "they had two and one".split(), "upos": ["PRON", "VERB", "NUM", "CCONJ", "NUM"]},
         {"words": "who was first".split(), "upos": ["PRON", "AUX", "ADJ"]}] * 3


def _finetune(tiny_checkpoint, method, extra=()):
    path = tiny_checkpoint(layers=4)
    tok = data.load_tokenizer(path)
    enc = model.Encoder.from_pretrained(path, mlm_head=True)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    train = data.encode_tagged(tok, [s["words"] for s in SENTS], [s["upos"] for s in SENTS], 32)
    examples = data.encode(tok, ["le chat est la", "der hund ist nicht da", "the first one"], 32)
    vocab = continual.mlm_vocab([examples], tok, enc.config.vocab_size)
    mem = continual.Memory(examples, vocab, tok, enc.config.vocab_size, 2, 0.3, seed=0)
    args = continual.parse_args(["--batch_size", "4", "--epochs", "2", "--lr", "1e-3", "--freeze_layers", "2",
                                 "--log_every", "100", *extra])
    head = model.TokenClassificationHead(enc.config.hidden_size, len(data.UPOS_TAGS))
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    info = continual.finetune(enc, head, method, train, SENTS[:4], mem, tok, args, torch.device("cpu"))
    return enc, head, before, head_before, info


def test_freeze_keeps_the_bottom_layers_bit_identical(tiny_checkpoint):
    enc, head, before, head_before, info = _finetune(tiny_checkpoint, "freeze")
    after = enc.state_dict()
    assert info["steps"] == 6
    for k, v in after.items():
        if k.startswith(("embed.", "layers.0.", "layers.1.", "mlm.")):
            assert torch.equal(v, before[k]), f"{k} changed although frozen"
    for i in (2, 3):
        assert not torch.equal(after[f"layers.{i}.qkv.weight"], before[f"layers.{i}.qkv.weight"])
    assert not torch.equal(head.state_dict()["out.weight"], head_before["out.weight"])


def test_naive_changes_every_block_but_not_the_word_embeddings(tiny_checkpoint):
    enc, _, before, _, info = _finetune(tiny_checkpoint, "naive")
    after = enc.state_dict()
    for i in range(4):
        assert not torch.equal(after[f"layers.{i}.qkv.weight"], before[f"layers.{i}.qkv.weight"])
    assert torch.equal(after["embed.word.weight"], before["embed.word.weight"])    # frozen by default
    assert torch.equal(after["mlm.dense.weight"], before["mlm.dense.weight"])
    assert info["projected_steps"] is None and len(info["history"]) >= 1


def test_agem_finetune_counts_projections(tiny_checkpoint):
    enc, _, before, _, info = _finetune(tiny_checkpoint, "agem", ["--eval_every", "3"])
    assert 0 <= info["projected_steps"] <= info["steps"] == 6
    assert -1.0 <= info["mean_cos_g_gref"] <= 1.0
    assert [h["step"] for h in info["history"]] == [3, 6]
    assert not torch.equal(enc.state_dict()["layers.0.qkv.weight"], before["layers.0.qkv.weight"])


# ----------------------------------------------------------------------------------------------------
# end to end, and bad input
# ----------------------------------------------------------------------------------------------------

def test_end_to_end_all_methods(tiny_checkpoint, data_dir, tmp_path, device):
    ckpt = tiny_checkpoint(mlm_head=False, hidden=32, layers=2)
    out = tmp_path / "out"
    argv = ["--method", "all", "--model", str(ckpt), "--data_dir", str(data_dir), "--out_dir", str(out),
            "--langs", "deu_Latn,fra_Latn", "--limit", "16", "--eval_limit", "8", "--memory_langs",
            "eng_Latn,deu_Latn", "--memory_per_lang", "4", "--memory_eval_per_lang", "2", "--mlm_head_steps", "3",
            "--batch_size", "8", "--max_len", "32", "--freeze_layers", "1", "--seeds", "0", "--device", device]
    res = continual.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert {"script", "paper", "command", "config", "seeds", "results", "mean", "std", "comparisons", "units",
            "hardware", "seconds", "details"} <= set(saved)
    assert saved["script"] == "continual.py" and saved["seeds"] == [0]
    assert saved["config"]["method"] == ["all"] and saved["seconds"] > 0
    runs, details = saved["results"]["0"], saved["details"]
    assert list(runs) == ["before", "naive", "freeze", "multitask", "agem"] == list(saved["mean"])
    curves = details["per_layer"]["0"]
    for row in curves.values():
        assert set(row) == {"deu_Latn", "fra_Latn"}
        assert all(len(v) == 3 and all(0 <= x <= 100 for x in v) for v in row.values())
    # freeze keeps embeddings + block 1: its retrieval up to layer 1 equals the pre-trained one exactly
    for lang in ("deu_Latn", "fra_Latn"):
        assert curves["freeze"][lang][:2] == curves["before"][lang][:2]
        assert runs["agem"][f"tatoeba {lang}"] == curves["agem"][lang][-1]
    assert not any(k.startswith("pos ") for k in runs["before"])
    for method in ("naive", "freeze", "multitask", "agem"):
        assert {"pos en", "pos de", "pos fr", "pos avg", "pos zero-shot avg", "dev", "tatoeba avg"} <= set(runs[method])
    assert all({"mlm loss", "mlm accuracy"} <= set(row) for row in runs.values())
    head_info = details["mlm_head"]["0"]
    assert head_info["loaded"] is False and Path(head_info["cache"]).is_file()
    assert isinstance(details["train"]["0"]["agem"]["projected_steps"], int)
    assert "embed.word.weight" not in details["agem_shared_parameter_names"]
    md = (out / "results.md").read_text()
    assert "| agem |" in md and "| layer 2 |" in md and "zero-shot avg" in md
    # paired bootstrap CIs: each method minus naive (POS, retrieval), and naive's forgetting (retrieval)
    ci = saved["comparisons"]
    assert [(c["method"], c["baseline"], c["test"]) for c in ci] == [
        (m, "naive", t) for m in ("freeze", "multitask", "agem") for t in ("pos zero-shot avg", "tatoeba avg")] + [
        ("naive", "before", "tatoeba avg")]
    for c in ci:
        mean = saved["mean"]
        assert c["difference"] == pytest.approx(mean[c["method"]][c["test"]] - mean[c["baseline"]][c["test"]])
        assert c["low"] <= c["difference"] <= c["high"] and c["seeds"] == [0] and c["sentences"] == 16
        assert f"| {c['method']} | {c['baseline']} | {c['test']} | {c['difference']:+.1f} |" in md
    enc, head, cfg = model.load_with_head(out / "agem")
    assert cfg["xlt_continual"]["method"] == "agem" and head.num_labels == len(data.UPOS_TAGS)
    assert res["results"]["0"]["agem"]["dev"] == runs["agem"]["dev"]
    # some of the methods, in METHODS' order whatever the command's; the head comes from the cache
    continual.main(["--method", "agem", "naive"] + argv[2:] + ["--no_save", "--restart"])
    again = json.loads((out / "results.json").read_text())
    assert again["details"]["mlm_head"]["0"]["loaded"] is True
    assert list(again["results"]["0"]) == ["before", "naive", "agem"]
    assert [(c["method"], c["baseline"], c["test"]) for c in again["comparisons"]] == [
        ("agem", "naive", "pos zero-shot avg"), ("agem", "naive", "tatoeba avg"), ("naive", "before", "tatoeba avg")]


def test_bad_flags_fail_with_one_line(tmp_path):
    with pytest.raises(model.XltError, match="--langs"):
        continual.main(["--langs", "deu_Latn,xxx", "--out_dir", str(tmp_path)])
    for argv in (["--batch_size", "0"], ["--mlm_prob", "1.5"], ["--method", "gem"]):     # A-GEM is "agem"
        with pytest.raises(SystemExit):
            continual.parse_args(argv)
    r = subprocess.run([sys.executable, str(REPO / "continual.py"), "--langs", "klingon", "--out_dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and r.stderr.strip().startswith("error: --langs") and "\n" not in r.stderr.strip()


def test_mlm_head_cache_is_keyed_by_the_checkpoint_contents_and_refits_a_corrupt_file(tiny_checkpoint, tmp_path,
                                                                                      capsys):
    from conftest import make_tiny_checkpoint
    path = tiny_checkpoint(mlm_head=False)
    tok = data.load_tokenizer(path)
    examples = data.encode(tok, ["the first one was new", "le chat est la"] * 4, 16)

    def head(out):
        model.set_seed(0)                                                            # as main: the fresh head's init
        enc = model.Encoder.from_pretrained(path, mlm_head=True)
        vocab = continual.mlm_vocab([examples], tok, enc.config.vocab_size)
        mem = continual.Memory(examples, vocab, tok, enc.config.vocab_size, 4, 0.3, seed=0)
        args = continual.parse_args(["--model", str(path), "--out_dir", str(tmp_path / "out"), "--mlm_head_steps", "3"])
        info = continual.mlm_head(enc, mem, args, 0, torch.device("cpu"))
        return info, {k: v.clone() for k, v in enc.mlm.state_dict().items()}, out.readouterr().out

    first, fitted, _ = head(capsys)
    assert not first["loaded"]
    Path(first["cache"]).write_bytes(b"\x08\0\0\0\0\0\0\0{broken")                 # a truncated/corrupt cache file
    again, refitted, out = head(capsys)
    assert not again["loaded"] and again["cache"] == first["cache"] and "is unusable" in out
    assert all(torch.equal(refitted[k], fitted[k]) for k in fitted)                  # same seed, same fit
    assert head(capsys)[0]["loaded"]                                                 # the rewritten file is read
    make_tiny_checkpoint(path, seed=1, mlm_head=False)                              # other weights, same path
    changed, _, _ = head(capsys)
    assert not changed["loaded"] and changed["cache"] != first["cache"]
