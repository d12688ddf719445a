"""distill.py: the distillation losses against hand computations, their gradients, the data-parallel loss
scaling, sharded prediction, and an end-to-end run of the script on tiny random models and real SIB-200 rows."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import distill
import evaluate
import model


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------------------------------
# approach 1: (1 - a) CE + a T^2 KL(p_t^T || p_s^T)
# ----------------------------------------------------------------------------------------------------

def test_kd_loss_matches_hand_computation():
    s, t, y, a, T = [1.0, 2.0, 0.0], [0.5, -1.0, 2.0], 1, 0.3, 2.0
    ce = -math.log(softmax(s)[y])
    ps, pt = softmax([v / T for v in s]), softmax([v / T for v in t])
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected = (1 - a) * ce + a * T * T * kl
    got = distill.kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), a, T)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_per_example():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    full = distill.kd_loss(s, t, y, 0.5, 3.0)
    rows = torch.cat([distill.kd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], 0.5, 3.0) for i in range(4)])
    assert torch.allclose(full, rows)


def test_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    y = torch.randint(7, (6,), generator=g)
    for T in (1.0, 4.0):
        assert torch.allclose(distill.kd_loss(s, t, y, 0.0, T), F.cross_entropy(s, y, reduction="none"))


def test_kl_is_zero_with_zero_gradient_when_teacher_equals_student():
    s = torch.tensor([[0.3, -1.2, 2.0, 0.1]], requires_grad=True)
    y = torch.tensor([2])
    loss = distill.kd_loss(s, s.detach().clone(), y, 1.0, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.sum().backward()
    assert s.grad.abs().max().item() < 1e-6          # float32 round-off only
    # and it is positive as soon as they differ
    assert distill.kd_loss(s.detach(), s.detach() + torch.tensor([[1.0, 0, 0, 0]]), y, 1.0, 2.0).item() > 1e-3


def grad_norm_of_kl(s, t, T, times_t_squared):
    s = s.clone().requires_grad_(True)
    loss = distill.kd_loss(s, t, torch.zeros(len(s), dtype=torch.long), 1.0, T).sum()
    if not times_t_squared:
        loss = loss / T ** 2                       # the bare KL(p_t^T || p_s^T)
    loss.backward()
    return s.grad.norm().item()


def test_temperature_squared_keeps_gradient_scale():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    Ts = (1.0, 2.0, 4.0, 8.0, 16.0)
    with_t2 = [grad_norm_of_kl(s, t, T, True) for T in Ts]
    bare = [grad_norm_of_kl(s, t, T, False) for T in Ts]
    # High-temperature limit: d(T^2 KL)/dz_s = T (p_s^T - p_t^T) -> ((z_s - mean z_s) - (z_t - mean z_t)) / C.
    c = lambda z: z - z.mean(-1, keepdim=True)
    limit = ((c(s) - c(t)) / s.shape[1]).norm().item()
    assert with_t2[-1] == pytest.approx(limit, rel=0.02)
    assert with_t2[-2] / with_t2[-1] == pytest.approx(1.0, abs=0.05)          # roughly constant for large T
    assert 0.5 < with_t2[0] / with_t2[-1] < 2.0                               # same order even at T = 1
    for T, a, b in zip(Ts[2:], bare[1:], bare[2:]):                           # without T^2: shrinks like 1/T^2
        assert a / b == pytest.approx(4.0, rel=0.1), T


# ----------------------------------------------------------------------------------------------------
# approach 2: ||W h_s + c - h~_t||^2 / d_t through a learned map
# ----------------------------------------------------------------------------------------------------

def test_representation_loss_value():
    mapped = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert distill.representation_loss(mapped, teacher).tolist() == pytest.approx([0.5, 6.5])


def tiny_encoder(hidden, seed=0):
    torch.manual_seed(seed)
    return model.Encoder(model.Config(vocab_size=40, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=2 * hidden, max_position_embeddings=32, pad_token_id=0))


def test_projection_maps_student_width_to_teacher_width():
    enc = tiny_encoder(48)
    clf = distill.Classifier(enc, model.ClassificationHead(48, 7), proj=nn.Linear(48, 32))
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    logits, z = clf(ids, (ids != 0).long())
    assert logits.shape == (2, 7) and z.shape == (2, 32)
    loss = distill.representation_loss(z, torch.zeros(2, 32)).mean()
    loss.backward()
    assert clf.proj.weight.grad.shape == (32, 48) and clf.proj.weight.grad.abs().sum() > 0
    assert enc.layers[0].qkv.weight.grad.abs().sum() > 0        # the student itself is pulled too
    # without a map, z is the pooled vector the head reads
    clf.proj = None
    clf.eval()
    logits, z = clf(ids, (ids != 0).long())
    assert z.shape == (2, 48)
    assert torch.allclose(logits, clf.head.out(model.mean_pool(enc(ids, (ids != 0).long()), (ids != 0).long())),
                          atol=1e-6)


def test_standardise_centres_and_scales_by_one_number():
    t = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
    out = distill.standardise(t)
    assert torch.allclose(out.mean(0), torch.zeros(2), atol=1e-6)
    assert out.pow(2).mean().item() == pytest.approx(1.0)                 # a fraction of the total variance
    centred = t - t.mean(0)
    assert torch.allclose(out / out[0, 0], centred / centred[0, 0])        # one scalar: the geometry is kept


def test_fit_linear_map_recovers_a_linear_relation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    y = x @ w.T + b
    lin = distill.fit_linear_map(x, y, ridge=1e-9)
    assert lin.weight.shape == (4, 6)
    assert torch.allclose(lin.weight, w, atol=1e-4) and torch.allclose(lin.bias, b, atol=1e-4)
    shrunk = distill.fit_linear_map(x, y, ridge=10.0)        # the ridge shrinks the map
    assert shrunk.weight.norm() < 0.5 * w.norm()


# ----------------------------------------------------------------------------------------------------
# data parallelism: the loss scaling and the sharded prediction
# ----------------------------------------------------------------------------------------------------

def test_rank_loss_scaling_gives_the_global_batch_gradient():
    """Each rank's loss = (sum over its slice) * world / global batch size; DDP averages the gradients, so
    the average must equal the gradient of the mean over the global batch, even for unequal slices."""
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(7, 5, generator=g), torch.randint(3, (7,), generator=g)
    lin.zero_grad()
    F.cross_entropy(lin(x), y).backward()
    full = lin.weight.grad.clone()
    world, grads = 2, []
    for idx in ([0, 1, 2, 3], [4, 5, 6]):             # np.array_split(7 rows, 2)
        lin.zero_grad()
        (F.cross_entropy(lin(x[idx]), y[idx], reduction="none").sum() * (world / 7)).backward()
        grads.append(lin.weight.grad.clone())
    assert torch.allclose(sum(grads) / world, full, atol=1e-6)


def test_predict_shards_join_to_the_full_prediction():
    enc = tiny_encoder(32, seed=5)
    clf = distill.Classifier(enc, model.ClassificationHead(32, 3))
    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": [2] + torch.randint(5, 40, (int(n),), generator=g).tolist() + [3],
                 "token_type_ids": [0] * (int(n) + 2), "label": 0, "index": i}
                for i, n in enumerate(torch.randint(1, 20, (23,), generator=g))]
    clf.train()                                          # predict must switch dropout off ...
    full_logits, full_z = distill.predict(clf, examples, 0, torch.device("cpu"), batch_size=4)
    assert clf.training                                  # ... and restore the mode afterwards
    parts = [distill.predict(clf, examples, 0, torch.device("cpu"), rank=r, world=3, batch_size=4) for r in range(3)]
    assert torch.allclose(sum(p[0] for p in parts), full_logits, atol=1e-6)
    assert torch.allclose(sum(p[1] for p in parts), full_z, atol=1e-6)
    # one sentence at a time (no padding) gives the same numbers: padding is masked out
    single = distill.predict(clf, examples, 0, torch.device("cpu"), batch_size=1)[0]
    assert torch.allclose(single, full_logits, atol=1e-5)
    clf.eval()
    with torch.no_grad():
        ids = torch.tensor([examples[7]["input_ids"]])
        direct = clf(ids, torch.ones_like(ids))[0][0]
    assert torch.allclose(direct, full_logits[7], atol=1e-5)


def test_dropout_flag_reaches_every_dropout(tiny_checkpoint):
    """--dropout goes to Encoder.from_pretrained and, through the config, to the head new_classifier adds."""
    base = model.Encoder.from_pretrained(tiny_checkpoint("t", hidden=32, mlm_head=False), dropout=0.0, verbose=False)
    clf = distill.new_classifier(base, 3, SimpleNamespace(train_embeddings=False, pooling="mean"), seed=1)
    assert all(m.p == 0.0 for m in clf.modules() if isinstance(m, nn.Dropout))
    assert all(b.attn_dropout == 0.0 for b in clf.encoder.layers)
    assert clf.encoder.config.hidden_dropout_prob == 0.0 and clf.encoder.config.attention_probs_dropout_prob == 0.0
    assert not clf.encoder.embed.word.weight.requires_grad and clf.encoder.layers[0].qkv.weight.requires_grad


def test_results_mean_and_std_over_seeds():
    """What main reports: each seed's row with its averages (evaluate.with_averages), then mean and sample
    std over seeds (evaluate.mean_std); the zero-shot average's std is over the seeds' own averages."""
    rows = {1: {"eng_Latn": 80.0, "deu_Latn": 60.0, "fra_Latn": 50.0},
            2: {"eng_Latn": 90.0, "deu_Latn": 70.0, "fra_Latn": 70.0}}
    per_seed = {s: {"baseline": evaluate.with_averages(r, "eng_Latn")} for s, r in rows.items()}
    mean, std = evaluate.mean_std(per_seed)
    assert {k: mean["baseline"][k] for k in rows[1]} == {"eng_Latn": 85.0, "deu_Latn": 65.0, "fra_Latn": 60.0}
    assert mean["baseline"]["zero-shot avg"] == 62.5                  # mean of 55 and 70
    assert std["baseline"]["zero-shot avg"] == pytest.approx(math.sqrt(((55 - 62.5) ** 2 + (70 - 62.5) ** 2) / 1))
    assert per_seed[2]["baseline"]["zero-shot avg"] == 70.0
    _, one = evaluate.mean_std({1: per_seed[1]})
    assert set(one["baseline"].values()) == {None}                    # one seed: no std


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [(["--alpha", "1.5"], "--alpha"), (["--temperature", "0"], "--temperature"),
                                        (["--epochs", "0"], "--epochs"), (["--seeds", "1", "1"], "--seeds"),
                                        (["--dropout", "1"], "--dropout"), (["--beta", "-1"], "--beta")])
def test_bad_flags_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        distill.parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err.splitlines()[-1]


def test_pair_task_without_files_names_the_folder(tmp_path):
    args = distill.parse_args(["--task", "xnli", "--data_dir", str(tmp_path)])
    with pytest.raises(data.DataError, match=str(tmp_path / "xnli")):
        distill.load_task(args)


def write_pawsx(root, labels=(0, 1)):
    root.mkdir(parents=True)
    rows = ["id\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe {w} was in the city\tin the city was the {w}\t{labels[i % len(labels)]}"
        for i, w in enumerate("cat dog house king river film game song law car road tree".split())]
    for name in ("train-en", "dev-en", "test-en", "test-de"):
        (root / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_pair_task_labels_out_of_range(tmp_path):
    write_pawsx(tmp_path / "pawsx", labels=(0, 2))
    args = distill.parse_args(["--task", "pawsx", "--data_dir", str(tmp_path)])
    with pytest.raises(data.DataError, match="out of range"):
        distill.load_task(args)
    args = distill.parse_args(["--task", "pawsx", "--data_dir", str(tmp_path), "--langs", "de,fr"])
    with pytest.raises(data.DataError, match="--langs: .* no test-fr.tsv file .it has: de, en"):
        distill.load_task(args)


# ----------------------------------------------------------------------------------------------------
# end to end, on tiny random checkpoints (teacher width 32, student width 48)
# ----------------------------------------------------------------------------------------------------

SCHEMA = {"script", "paper", "command", "config", "seeds", "results", "mean", "std", "comparisons", "units", "hardware",
          "seconds", "details"}


def test_end_to_end_sib200(tiny_checkpoint, data_dir, tmp_path, device):
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)
    out = tmp_path / "out"
    langs = ["eng_Latn", "deu_Latn", "amh_Ethi"]
    result = distill.main(["--teacher", str(teacher), "--student", str(student), "--data_dir", str(data_dir),
                           "--out_dir", str(out), "--langs", ",".join(langs), "--limit", "32",
                           "--eval_limit", "16", "--epochs", "2", "--batch_size", "8", "--log_every", "2",
                           "--device", device])
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == SCHEMA and saved["script"] == "distill.py" and saved["seeds"] == [1]
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    assert list(saved["results"]["1"]) == list(distill.METHODS)
    for method in distill.METHODS:
        row = saved["results"]["1"][method]
        assert list(row) == langs + ["avg", "zero-shot avg"] and all(0 <= v <= 100 for v in row.values())
        assert row["zero-shot avg"] == pytest.approx((row["deu_Latn"] + row["amh_Ethi"]) / 2)
        assert saved["mean"][method] == row and set(saved["std"][method].values()) == {None}
    assert saved["config"]["limit"] == 32 and saved["details"]["world_size"] == 1 and saved["seconds"] > 0
    assert saved["details"]["sizes"]["train"] == 32 and saved["details"]["sizes"]["test"]["amh_Ethi"] == 16
    md = (out / "results.md").read_text()
    assert "| method | eng_Latn | deu_Latn | amh_Ethi | avg | zero-shot avg |" in md
    # the key differences with their paired bootstrap CIs: the tables' differences, in results.json and .md
    ci = saved["comparisons"]
    assert [(r["method"], r["test"]) for r in ci] == [
        (m, t) for m in ("output_distill", "repr_distill") for t in ("zero-shot avg", "eng_Latn")] + [
        ("teacher", "eng_Latn")]                                 # the premise: teacher minus student in English
    for r in ci:
        mean = saved["mean"]
        assert r["baseline"] == "baseline" and r["seeds"] == [1]
        assert r["sentences"] == (32 if r["test"] == "zero-shot avg" else 16)           # deu + amh, or English
        assert r["difference"] == pytest.approx(mean[r["method"]][r["test"]] - mean["baseline"][r["test"]])
        assert r["low"] <= r["difference"] <= r["high"]
        assert (f"| {r['method']} | baseline | {r['test']} | {r['difference']:+.1f} | [{r['low']:+.1f}, "
                f"{r['high']:+.1f}] | 1 x {r['sentences']} |") in md
    log = saved["details"]["train_log"]["1"]
    assert set(log) == set(distill.METHODS) and len(log["baseline"]["dev_curve"]) == 2
    assert all(math.isfinite(loss) for _, loss in log["repr_distill"]["loss"])
    res = saved["results"]["1"]                 # the premise, checked and kept: teacher minus student in English
    assert log["baseline"]["teacher_minus_student"] == {
        "dev": round(log["teacher"]["dev"] - log["baseline"]["dev"], 2),
        "test": round(res["teacher"]["eng_Latn"] - res["baseline"]["eng_Latn"], 2)}

    # every method's checkpoint loads, with its own width, and reproduces the reported score
    for method in distill.METHODS:
        enc, head, cfg = model.load_with_head(out / method)
        assert enc.config.hidden_size == (32 if method == "teacher" else 48)
        assert head.num_labels == len(data.SIB200_LABELS) and cfg["xlt_distill"]["method"] == method
    enc, head, cfg = model.load_with_head(out / "baseline")
    tok = data.load_tokenizer(out / "baseline")
    rows = data.subset(data.read_sib200(data_dir, "deu_Latn", "test"), 16)
    examples = distill.encode_rows(tok, rows, 128, cfg["xlt_prefix"])
    acc = distill.score(distill.Classifier(enc, head).to(device), examples, data.special_ids(tok)["pad"],
                        "accuracy", torch.device(device))     # like with like: the device that trained it
    assert acc == saved["results"]["1"]["baseline"]["deu_Latn"]


def test_end_to_end_pair_task(tiny_checkpoint, tmp_path):
    write_pawsx(tmp_path / "data" / "pawsx")
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)
    result = distill.main(["--teacher", str(teacher), "--student", str(student), "--task", "pawsx",
                           "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
                           "--epochs", "1", "--batch_size", "4", "--seeds", "1", "2"])
    assert set(result) == SCHEMA and result["seeds"] == [1, 2]
    assert [(r["method"], r["test"], r["seeds"]) for r in result["comparisons"]] == [
        (m, t, [1, 2]) for m in ("output_distill", "repr_distill") for t in ("zero-shot avg", "en")] + [
        ("teacher", "en", [1, 2])]                          # the premise: teacher minus student in English
    assert list(result["mean"]["baseline"]) == ["de", "en", "avg", "zero-shot avg"]   # every test-<lang>.tsv
    assert set(result["results"]) == {"1", "2"}
    assert result["mean"]["teacher"]["zero-shot avg"] == result["mean"]["teacher"]["de"]
    assert all(v is not None for v in result["std"]["teacher"].values())
    _, head, _ = model.load_with_head(tmp_path / "out" / "output_distill")
    assert head.num_labels == 2


def test_student_layers_keeps_the_bottom_blocks(tiny_checkpoint, tmp_path):
    """--student_layers 1: a 1-block student (of 2) trains, is saved with num_hidden_layers 1, and loads here
    and in transformers with every weight; its block is the pretrained bottom block."""
    write_pawsx(tmp_path / "data" / "pawsx")
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)
    result = distill.main(["--teacher", str(teacher), "--student", str(student), "--task", "pawsx",
                           "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
                           "--epochs", "1", "--batch_size", "4", "--lr", "1e-9", "--student_layers", "1"])
    assert result["config"]["student_layers"] == 1
    for method in distill.METHODS:
        enc, _, cfg = model.load_with_head(tmp_path / "out" / method)
        assert cfg["num_hidden_layers"] == len(enc.layers) == (2 if method == "teacher" else 1)
    pretrained = model.Encoder.from_pretrained(student)
    enc = model.load_with_head(tmp_path / "out" / "baseline")[0]
    assert torch.allclose(enc.layers[0].qkv.weight, pretrained.layers[0].qkv.weight, atol=1e-6)   # lr ~ 0
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.AutoModel.from_pretrained(tmp_path / "out" / "baseline", output_loading_info=True)
    assert hf.config.num_hidden_layers == 1 and not info["unexpected_keys"]
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}    # xlt keeps no pooler
    with pytest.raises(model.XltError, match="--student_layers 3: .* has 2 blocks"):
        model.keep_layers(pretrained, 3)


def test_several_seeds_without_a_zero_shot_language(tiny_checkpoint, tmp_path):
    """--langs only the training language: there is no zero-shot average (None), and the summary over
    seeds must say so instead of failing to format it. --no_save: results, but no model."""
    write_pawsx(tmp_path / "data" / "pawsx")
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)
    result = distill.main(["--teacher", str(teacher), "--student", str(student), "--task", "pawsx",
                           "--langs", "en", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
                           "--epochs", "1", "--batch_size", "4", "--seeds", "1", "2", "--no_save"])
    assert list(result["results"]["1"]["baseline"]) == ["en", "avg", "zero-shot avg"]
    assert {m["zero-shot avg"] for m in result["mean"].values()} == {None}
    assert {s["zero-shot avg"] for s in result["std"].values()} == {None}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["mean"]["teacher"]["zero-shot avg"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "results.json", "results.md", "units"]


def test_macro_f1_comparisons_say_no_interval(tiny_checkpoint, data_dir, tmp_path):
    """NusaX reports macro-F1, not a mean over sentences: the comparison rows say so, with no fake interval."""
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)
    result = distill.main(["--teacher", str(teacher), "--student", str(student), "--task", "nusax", "--data_dir",
                           str(data_dir), "--out_dir", str(tmp_path / "out"), "--langs", "english,indonesian",
                           "--limit", "16", "--eval_limit", "8", "--epochs", "1", "--batch_size", "8", "--no_save"])
    assert [(r["method"], r["test"], r["difference"], r["low"], r["note"]) for r in result["comparisons"]] == [
        (m, t, None, None, "macro-F1 is not a mean over sentences") for m, t in [
            (m, t) for m in ("output_distill", "repr_distill") for t in ("zero-shot avg", "english")] + [
            ("teacher", "english")]]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| - | not computed: macro-F1 is not a mean over sentences | - |" in md
