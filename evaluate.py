"""evaluate.py: how xlt measures cross-lingual transfer, and how every run reports it.

Metrics (in percent); zero-shot classification and POS tagging of a fine-tuned encoder + head; Tatoeba
retrieval (optionally per hidden state); the English fine-tune-and-select protocol; results (markdown tables,
paired bootstrap CIs of each script's key differences, the one results.json schema); every script's
command-line vocabulary; and a command line of its own:

    python evaluate.py --model out/distill/baseline --task sib200                 # DEFAULT_SIB200_LANGS
    python evaluate.py --model intfloat/multilingual-e5-small --task tatoeba --langs deu,fra --per_layer

Conventions: a Tatoeba score is xx->en top-1 (each foreign sentence retrieves its English translation among
all English sentences of its file), as XTREME reports it; the JSON has both directions. POS accuracy counts
every word (one cut off by max_len is wrong). NusaX reports macro-F1 (as its paper does), the rest accuracy.
No input prefix by default: e5's "query: " measured worse on Tatoeba (README.md); --prefix auto adds it.
"""
import argparse
import copy
import errno
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model
from model import XltError

# Typologically diverse, so that an average is not one of English's close relatives: eng (trained on),
# deu/fra/spa (Latin, Indo-European), rus (Cyrillic), zho/jpn (Han, no spaces), arb (right-to-left), hin
# (Devanagari), tur (agglutinative), tha (Thai), swh/yor (lower-resource African), amh (Ge'ez, poorly tokenized).
DEFAULT_SIB200_LANGS = ["eng_Latn", "deu_Latn", "fra_Latn", "spa_Latn", "rus_Cyrl", "zho_Hans", "jpn_Jpan",
                        "arb_Arab", "hin_Deva", "tur_Latn", "tha_Thai", "swh_Latn", "yor_Latn", "amh_Ethi"]
# The same languages in Tatoeba's codes (Yoruba has no Tatoeba set; English is the pivot of every pair).
DEFAULT_TATOEBA_LANGS = ["deu", "fra", "spa", "rus", "cmn", "jpn", "ara", "hin", "tur", "tha", "swh", "amh"]


# -------------------- metrics ---------------------------------------------------------------------
def accuracy(preds, labels):
    """Percentage of positions where the prediction equals the label."""
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy: no examples")
    return 100.0 * sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds, labels, num_labels):
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), in percent. A class that occurs
    neither among the labels nor among the predictions (0/0) is skipped; one never predicted counts 0."""
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"macro_f1: {len(preds)} predictions but {len(labels)} labels")
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp_fn = sum((p == c) != (y == c) for p, y in zip(preds, labels))        # the errors involving c
        if tp + fp_fn:
            f1s.append(2 * tp / (2 * tp + fp_fn))
    if not f1s:
        raise ValueError("macro_f1: no examples")
    return 100.0 * sum(f1s) / len(f1s)


# -------------------- Zero-shot classification and tagging ---------------------------------------
def length_batches(examples, batch_size):
    """Index batches in order of length: similar lengths share a batch, so padding is small."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def predict(encoder, head, examples, pad_id, device, batch_size=64):
    """Per example, the head's argmax (a class id, or for a token head a list as long as its input_ids)."""
    device, preds = torch.device(device), [None] * len(examples)
    with model.evaluating(encoder, head):
        for idx in length_batches(examples, batch_size):
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad_id), device)
            with model.autocast(device):
                h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                out = model.finite(head(h, batch["attention_mask"]), "the model's outputs").argmax(-1).tolist()
            for i, p in zip(idx, out):
                preds[i] = p[:len(examples[i]["input_ids"])] if isinstance(p, list) else p
    return preds


def hits(preds, labels):
    """A test set's per-row outcomes as one string, '1' where the prediction is right, '0' where it is wrong:
    what compare() needs, compact in a unit's JSON record."""
    return "".join("01"[p == y] for p, y in zip(preds, labels))


def classification_scores(encoder, head, tok, sets, device, max_len=128, prefix="", metric="accuracy", desc="eval",
                          outcomes=False):
    """{name: percent} for sets = {name: rows}, a row being {'text', 'label'} or {'text_a', 'text_b',
    'label'}. metric: 'accuracy' or 'macro_f1' (over the head's classes). outcomes: return also
    {name: hits(...)}, the per-row outcomes."""
    pad_id, scores, rights = data.special_ids(tok)["pad"], {}, {}
    for name, rows in tqdm(sets.items(), desc=desc, leave=False):
        if not rows:
            raise data.DataError(f"{desc}: {name} has no examples")
        examples = data.encode_rows(tok, rows, max_len, prefix)
        preds, labels = predict(encoder, head, examples, pad_id, device), [ex["label"] for ex in examples]
        scores[name] = macro_f1(preds, labels, head.num_labels) if metric == "macro_f1" else accuracy(preds, labels)
        rights[name] = hits(preds, labels)
    return (scores, rights) if outcomes else scores


def sib200_scores(encoder, head, tok, data_dir, langs, device, split="test", max_len=128, prefix="", limit=None,
                  outcomes=False):
    """{FLORES code: accuracy} of a 7-way topic classifier on SIB-200 (Adelani et al. 2024); outcomes: and the
    per-row outcomes (classification_scores)."""
    sets = {lang: data.subset(data.read_sib200(data_dir, lang, split), limit) for lang in langs}
    return classification_scores(encoder, head, tok, sets, device, max_len, prefix, desc=f"SIB-200 {split}",
                                 outcomes=outcomes)


def xnli_rows(data_dir, split="test"):
    """{language: rows} of XNLI 1.0's xnli.{split}.tsv, which you put in DATA_DIR/xnli (CC BY-NC: no public copy)."""
    path = data.resolve_data_dir(data_dir) / "xnli" / f"xnli.{split}.tsv"
    if not path.is_file():
        raise data.DataError(f"{path} does not exist; XNLI is not downloaded by data.py: put XNLI-1.0's "
                             f"xnli.{split}.tsv there (https://cims.nyu.edu/~sbowman/xnli/)")
    rows = data.read_pair_tsv(path)
    header, *lines = [line.split("\t") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if "language" not in header:
        raise data.DataError(f"{path} line 1: no 'language' column (expected XNLI 1.0's xnli.{split}.tsv)")
    out = {}
    for fields, row in zip(lines, rows):
        out.setdefault(fields[header.index("language")], []).append(row)
    return out


def pos_accuracy(encoder, head, tok, sentences, device, max_len=256, outcomes=False):
    """UPOS accuracy (percent) over every word of sentences ([{'words', 'upos'}]), a word tagged by the
    prediction at its first subword; words cut off by max_len or tokenized to nothing count as wrong.
    outcomes: return also the per-sentence outcomes, 'correct/words' per sentence, space-separated."""
    examples = data.encode_tagged(tok, [s["words"] for s in sentences], [s["upos"] for s in sentences], max_len)
    preds = predict(encoder, head, examples, data.special_ids(tok)["pad"], device)
    correct = [sum(p == y for p, y in zip(pred, ex["labels"]) if y != -100) for ex, pred in zip(examples, preds)]
    words = [len(s["words"]) for s in sentences]
    if not sum(words):
        raise ValueError("pos_accuracy: no words")
    acc = 100.0 * sum(correct) / sum(words)
    return (acc, " ".join(f"{c}/{w}" for c, w in zip(correct, words))) if outcomes else acc


def pos_scores(encoder, head, tok, data_dir, langs, device, max_len=256, limit=None, outcomes=False):
    """{ISO 639-1 code: UPOS accuracy} on the UD PUD test sets (the same 1,000 sentences in every language);
    outcomes: ({code: accuracy}, {code: per-sentence outcomes}) (pos_accuracy)."""
    files = data.ud_pud_files(data_dir)
    missing = [lang for lang in langs if lang not in files]
    if missing:
        raise data.DataError(f"no UD PUD test set for {', '.join(missing)} (there are: {', '.join(sorted(files))})")
    out = {lang: pos_accuracy(encoder, head, tok, data.subset(data.read_conllu(files[lang]), limit), device, max_len,
                              outcomes) for lang in tqdm(langs, desc="UD PUD", leave=False)}
    return ({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}) if outcomes else out


# -------------------- Sentence retrieval ---------------------------------------------------------
def embed(encoder, tok, texts, device, batch_size=64, max_len=128, all_layers=False, prefix=""):
    """Sentence vectors: the mean of the non-pad token states, float32 on the CPU. Last layer -> (N, H);
    all_layers -> (L+1, N, H), index 0 the embedding output, index l layer l."""
    device, pad_id = torch.device(device), data.special_ids(tok)["pad"]
    examples = data.encode(tok, [prefix + t for t in texts], max_len)
    out = torch.zeros(encoder.config.num_hidden_layers + 1 if all_layers else 1, len(examples),
                      encoder.config.hidden_size)
    with model.evaluating(encoder):
        for idx in length_batches(examples, batch_size):
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad_id), device)
            with model.autocast(device):
                hs = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                             output_hidden_states=all_layers)
            for layer, h in enumerate(hs if all_layers else [hs]):
                out[layer, idx] = model.mean_pool(h.float(), batch["attention_mask"]).cpu()
    model.finite(out, "the sentence vectors")
    return out if all_layers else out[0]


def retrieval_top1(src, tgt, outcomes=False):
    """(src->tgt, tgt->src) top-1 accuracy in percent: row i of src translates row i of tgt; each row's
    nearest neighbour on the other side by cosine similarity must be its own translation. outcomes: and the
    src->tgt per-row outcomes (hits)."""
    if src.shape != tgt.shape:
        raise ValueError(f"retrieval_top1: src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must match")
    sim = F.normalize(src.float(), dim=-1) @ F.normalize(tgt.float(), dim=-1).T
    gold = torch.arange(len(src))
    scores = tuple(100.0 * (sim.argmax(dim) == gold).float().mean().item() for dim in (1, 0))
    return (*scores, hits(sim.argmax(1).tolist(), gold.tolist())) if outcomes else scores


def tatoeba(encoder, tok, data_dir, langs, device, per_layer=False, limit=None, prefix="", max_len=128, outcomes=False):
    """{lang: {'xx->en', 'en->xx', 'n', 'per_layer' (xx->en of every hidden state, or None)}} on LASER's
    Tatoeba (Artetxe & Schwenk 2019), on `limit` evenly spaced pairs per language (all by default; retrieval
    among fewer candidates is easier, so compare only numbers measured on the same pairs). outcomes: each
    language's dict has also 'hits', the per-pair xx->en outcomes at the last layer (hits)."""
    out = {}
    for lang in tqdm(langs, desc="Tatoeba", leave=False):
        pairs = data.subset(zip(*data.read_tatoeba(data_dir, lang)), limit)
        x, e = (embed(encoder, tok, [pair[side] for pair in pairs], device, 64, max_len, per_layer, prefix)
                for side in (0, 1))
        curve = [retrieval_top1(x[i], e[i])[0] for i in range(len(x))] if per_layer else None
        xx_en, en_xx, *found = retrieval_top1(x[-1] if per_layer else x, e[-1] if per_layer else e, outcomes)
        out[lang] = {"xx->en": xx_en, "en->xx": en_xx, "n": len(pairs), "per_layer": curve,
                     **({"hits": found[0]} if outcomes else {})}
    return out


def per_layer_table(curves):
    """Markdown: one row per hidden state, one column per run, each cell the mean over languages of the
    xx->en top-1; curves = {run: {lang: [percent per hidden state, embeddings first]}}."""
    names = list(curves)
    n_states = len(next(iter(curves[names[0]].values())))
    rows = {("emb" if i == 0 else f"layer {i}"): {n: statistics.fmean(c[i] for c in curves[n].values()) for n in names}
            for i in range(n_states)}
    return markdown_table(rows, row_name="hidden state", averages=False)


# -------------------- The English fine-tune-and-select protocol (align.py, transfer.py) ----------
def finetune(encoder, tok, train_rows, dev_rows, args, device, seed, prefix="", pooling="mean", desc="fine-tune",
             epoch_rows=None):
    """Fine-tune encoder + a fresh SIB-200 ClassificationHead on train_rows (whatever requires grad trains), one
    AdamW run with warmup/decay over args.epochs, and keep the epoch best on dev_rows (model selection on
    the training language only). epoch_rows(epoch) -> rows replaces train_rows per epoch (align.py's
    code-switching). Returns (head, log) with the best weights left in encoder and head."""
    model.set_seed(seed)                           # the same head init and dropout for every run
    head = model.ClassificationHead(encoder.config.hidden_size, len(data.SIB200_LABELS), pooling,
                                    encoder.config.hidden_dropout_prob).to(device)
    pad = data.special_ids(tok)["pad"]
    # tokenized once (per epoch only where epoch_rows changes the texts)
    examples, dev = (data.encode_rows(tok, rows, args.max_len, prefix) for rows in (train_rows, dev_rows))
    opt = model.configure_optimizer([encoder, head], args.lr, args.weight_decay)
    total = args.epochs * -(-len(train_rows) // args.batch_size)
    losses, log = model.LossLog(args.log_every, total, desc, opt), {"dev_curve": [], "loss": []}
    best, step = None, 0
    for epoch in range(args.epochs):
        if epoch_rows:
            examples = data.encode_rows(tok, epoch_rows(epoch), args.max_len, prefix)
        batches = data.bucket_batches([len(e["input_ids"]) for e in examples], args.batch_size, seed, epoch)
        encoder.train(), head.train()
        for idx in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{args.epochs}", leave=False):
            lr = model.set_lr(opt, model.lr_schedule(step, total, int(args.warmup * total)))
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad), device)
            with model.autocast(device):
                h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                loss = F.cross_entropy(head(h, batch["attention_mask"]).float(), batch["label"])
            loss.backward()
            model.optimizer_step(opt)
            step += 1
            if (mean := losses.add(loss)) is not None:
                log["loss"].append([step, round(mean[0], 4)])
                tqdm.write(f"[{desc}] step {step}/{total}  loss {mean[0]:.4f}  lr {lr:.2e}")
        losses.check()                                  # divergence: reported with its step, before scoring
        dev_acc = accuracy(predict(encoder, head, dev, pad, device), [ex["label"] for ex in dev])
        log["dev_curve"].append(round(dev_acc, 2))
        tqdm.write(f"[{desc}] epoch {epoch + 1}: dev accuracy {dev_acc:.1f}")
        if best is None or dev_acc > best[0]:
            best = (dev_acc, epoch + 1, model.trainable_state(encoder, head))
    losses.finish()
    model.restore(best[2])
    log.update(dev=round(best[0], 2), best_epoch=best[1])
    return head, log


# -------------------- Results: tables, and one results.json schema for every script --------------
def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def markdown_table(results, train_lang=None, digits=1, row_name="method", std=None, averages=True):
    """Rows = methods, columns = languages (in order of first appearance), then 'avg' over the row and,
    with train_lang, 'zero-shot avg' without it. results = {row: {column: percent}} (or one flat row);
    std, shaped like results, adds '± s' to a cell (e.g. the spread over seeds). A missing cell is '-'."""
    if results and all(isinstance(v, (int, float)) for v in results.values()):
        results = {"score": results}
    cols = list(dict.fromkeys(c for row in results.values() for c in row))
    averages = averages and "avg" not in cols          # rows from with_averages carry their own
    extra = (["avg"] + (["zero-shot avg"] if train_lang else [])) if averages else []

    def fmt(v, s=None):
        return "-" if v is None else f"{v:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")
    lines = ["| " + " | ".join([row_name] + cols + extra) + " |", "|---" + "|---:" * (len(cols) + len(extra)) + "|"]
    for name, row in results.items():
        s = (std or {}).get(name, {})
        cells = [fmt(row.get(c), s.get(c)) for c in cols] + [fmt(with_averages(row, train_lang)[k]) for k in extra]
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    return "\n".join(lines)


def with_averages(row, train_lang):
    """row plus its 'avg' and 'zero-shot avg' (without train_lang), so averages get their own mean and std."""
    return {**row, "avg": _mean(row.values()), "zero-shot avg": _mean(v for k, v in row.items() if k != train_lang)}


def mean_std(per_seed):
    """({method: {key: mean over seeds}}, {method: {key: sample std, or None with one seed}}); a seed that
    lacks a method (a partial results.json) is left out of that method's numbers."""
    runs = list(per_seed.values())
    mean, std = {}, {}
    for method in dict.fromkeys(m for r in runs for m in r):
        mean[method], std[method] = {}, {}
        for key in dict.fromkeys(k for r in runs for k in r.get(method, {})):
            values = [r[method][key] for r in runs if r.get(method, {}).get(key) is not None]
            mean[method][key] = statistics.fmean(values) if values else None
            std[method][key] = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def paired_bootstrap(a, b, n=1000, seed=0, weights=None):
    """(mean difference, low, high) in points: how much a method beats its baseline on one test set, with a paired
    bootstrap 95% confidence interval (Efron & Tibshirani 1993; Koehn 2004 for MT). a, b: per-sentence scores in
    [0, 1] (1 = correct) of the method and of its baseline on the same sentences, shape (seeds, sentences), row s of
    both trained with seed s (1-D: one seed). d = 100 (a - b). Each of the n resamples draws `sentences` sentence
    indices and, independently, `seeds` seed indices, both with replacement (a generator seeded `seed`); a and b
    are read at the same drawn cells (paired: one draw of sentences serves every seed and both systems) and the
    resample's statistic is the mean of d over every (drawn seed, drawn sentence) cell. Returns the mean of d over
    all cells and the 2.5th and 97.5th percentiles of the n statistics (torch.quantile, linear interpolation).
    Resampling both ways is conservative (a cell's own noise is counted by both draws), and with 3 seeds the seed
    draw is coarse: the interval's width is itself noisy.
    weights (sentences,), positive: a score that is a ratio of sums (POS: correct words / words). a and b are then
    per-sentence numerators (correct words), weights the denominators (words), and every statistic, the first
    returned value included, is 100 sum(a - b) / sum(weights) over the drawn cells; None: all 1, the mean above."""
    a, b = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    if a.shape != b.shape or a.dim() not in (1, 2) or not a.numel():
        raise ValueError(f"paired_bootstrap: a {tuple(a.shape)} and b {tuple(b.shape)} must both be "
                         f"(seeds, sentences), non-empty")
    d = 100 * (a - b).reshape(-1, a.shape[-1])
    S, N = d.shape
    w = torch.ones(N, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (N,) or not (w > 0).all():
        raise ValueError(f"paired_bootstrap: weights {tuple(w.shape)} must be ({N},), every one positive")
    generator = torch.Generator().manual_seed(seed)

    def counts(k):                                 # (n, k): how often each of k indices is drawn in each resample
        draws = torch.randint(k, (n, k), generator=generator)
        return torch.zeros(n, k, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n, k, dtype=torch.float64))
    seeds, sentences = counts(S), counts(N)
    stats = ((seeds @ d) * sentences).sum(1) / (S * (sentences @ w))    # drawn seeds, then drawn sentences
    low, high = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (d.sum() / (S * w.sum())).item(), low, high


def _cells(outcome):
    """(numerators, denominators) of one test set's outcomes: hits' '0'/'1' string, or pos_accuracy's
    'correct/words' per sentence."""
    if "/" in outcome:
        return tuple(zip(*((int(c), int(w)) for c, w in (x.split("/") for x in outcome.split()))))
    return tuple(int(c) for c in outcome), (1,) * len(outcome)


def compare(outcomes, pairs, why_not=None):
    """Paired bootstrap 95% CIs of the key differences of a run, the rows of results.json's 'comparisons' (and
    of results.md's last table, write_results). outcomes = {method: {seed: {test set: outcomes}}} (hits,
    pos_accuracy); pairs = [(method, baseline, name, [test sets])]: the test sets are pooled, each scaled by its
    total weight so that every set counts equally, as in the tables' averages (with sets of one size: the mean
    over (set, sentence) cells), and the difference is that of the tables' means over the seeds where both have
    every test set (a partial run: the others are left out, and so is a pair without such a seed). why_not: the
    score is not a mean over sentences (macro-F1): every pair gets a row without difference or interval saying so."""
    rows = []
    for method, baseline, name, sets in pairs:
        row = {"method": method, "baseline": baseline, "test": name}
        if why_not:
            rows.append({**row, "difference": None, "low": None, "high": None, "note": why_not})
            continue
        runs = [outcomes.get(m, {}) for m in (method, baseline)]
        seeds = [s for s in runs[0] if s in runs[1] and all(t in r[s] for r in runs for t in sets)]
        if not seeds:
            continue
        num, den = [], []                          # per system, (seeds, cells); den: (cells,)
        for system in runs:
            per_seed = []
            for s in seeds:
                cells = [_cells(system[s][t]) for t in sets]
                per_seed.append([x / sum(w) for c, w in cells for x in c])
                den.append([x / sum(w) for c, w in cells for x in w])
            num.append(per_seed)
        if any(d != den[0] for d in den):
            raise ValueError(f"compare: {method} and {baseline} were not scored on the same sentences of {sets}")
        diff, low, high = paired_bootstrap(num[0], num[1], weights=den[0])
        rows.append({**row, "difference": diff, "low": low, "high": high, "seeds": seeds, "sentences": len(den[0])})
    return rows


def comparison_table(rows):
    """Markdown: one line per row of compare()."""
    lines = ["Paired bootstrap 95% confidence intervals of the key differences (points; 1000 resamples of the test "
             "sentences and, independently, of the seeds)\n", "| method | baseline | test set | difference | 95% CI "
             "| seeds x sentences |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["difference"] is None:
            lines.append(f"| {r['method']} | {r['baseline']} | {r['test']} | - | not computed: {r['note']} | - |")
        else:
            lines.append(f"| {r['method']} | {r['baseline']} | {r['test']} | {r['difference']:+.1f} | "
                         f"[{r['low']:+.1f}, {r['high']:+.1f}] | {len(r['seeds'])} x {r['sentences']} |")
    return "\n".join(lines)


def write_json(path, obj):
    """Write obj as strict JSON (indent 2), atomically (model.atomic_file). NaN and infinity are not JSON:
    the training loops stop on a non-finite loss, so one reaching this point is a bug (ValueError)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with model.atomic_file(path, "w") as f:
        f.write(text)


def hardware(device):
    """One line: what a run's times were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


def write_results(args, script, paper, per_seed, tables, details, device, t0, run=None, comparisons=()):
    """OUT_DIR/results.json in the schema every script shares: script, paper, command, config, seeds,
    results {seed: {method: {key: number}}}, mean and std over seeds (same shape, one level up), comparisons
    (compare()'s rows: method minus baseline with its 95% CI), units (the finished and the pending units of the
    run folder: a partial file says what it lacks), hardware, seconds, and the script's own details; and
    OUT_DIR/results.md, the tables the README shows, the comparisons last. Scripts call it after every
    finished unit, so a killed run leaves a correct partial results.json."""
    mean, std = mean_std(per_seed)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"}
    units = run.progress() if run else None
    result = {"script": script, "paper": paper, "command": shlex.join(["python", script] + args.argv), "config": config,
              "seeds": list(per_seed), "results": {str(s): r for s, r in per_seed.items()}, "mean": mean,
              "std": std, "comparisons": list(comparisons), "units": units, "hardware": hardware(device),
              "seconds": round(time.time() - t0, 1), "details": details}
    out = Path(args.out_dir)
    write_json(out / "results.json", result)
    text = "\n\n".join(tables + ([comparison_table(comparisons)] if comparisons else []))
    with model.atomic_file(out / "results.md", "w") as f:
        f.write(text + "\n")
    if units and units["pending"]:
        print(f"[{script}] {len(units['done'])} of {len(units['done']) + len(units['pending'])} units finished; "
              f"wrote {out / 'results.json'} and results.md")
    else:
        print(f"\n{text}\n\n[{script}] wrote {out / 'results.json'} and results.md; {result['seconds']:.0f} s")
    return result


# -------------------- The run folder: checks, lock, finished units, resume -----------------------
class RunFolder:
    """--out_dir of one command, which a killed run can resume. Before any training it is checked (creatable,
    writable, room for `need` bytes) and locked (OUT_DIR/.lock, one run at a time); leftovers of a killed
    save (hidden .NAME.* temp files and folders, .NAME.old) are removed, since no other run can own them.

    A run is a list of *units* (a script's trained models, e.g. distill's "seed1-teacher"). A unit that
    trains a model publishes it first (model.save_pretrained: temp folder, then rename), then its record
    OUT_DIR/units/<unit>.json (scores, log, what later units need; tensors beside it in <unit>.safetensors),
    and only then counts as finished; results.json and results.md are rewritten after every finished unit.
    Rerunning the same command skips finished units (each is seeded from its seed at its start, so it does
    not depend on the units before it) and reproduces an uninterrupted run's numbers. OUT_DIR/units/run.json
    keeps the results-affecting flags: a different command refuses to add to the folder (another --out_dir,
    or --restart to discard the finished units). Not part of the fingerprint: where output goes and how it
    is logged (--out_dir, --log_every, --no_save), and the unit selectors (--seeds, and the script's own:
    `selectors`), so a rerun with another seed adds to the same folder.

    Saved models: each script keeps its policy (its docstring says which): distill and continual keep per
    method the English-dev-best unit over seeds (a finished unit's dev score is in its record, so a resumed
    run compares with the same ones), mblm and transfer the first seed's, align aligned/ and each fine-tune.
    """
    active = None                                    # the run of this process, for cli's Ctrl-C line
    NOT_RESULTS = {"out_dir", "log_every", "no_save", "seeds", "restart"}

    def __init__(self, args, script, selectors=(), rank=0):
        self.dir, self.script, self.rank, self.plan = Path(args.out_dir), script, rank, []
        self.units, self.lock = self.dir / "units", None
        if RunFolder.active:                         # one command per process: an earlier main() (tests) is over
            RunFolder.active.close()
        RunFolder.active = self
        if rank == 0:
            if self.dir.exists() and not self.dir.is_dir():
                raise XltError(f"--out_dir {self.dir} is a file, not a folder")
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.lock = open(self.dir / ".lock", "a+")
            except OSError as e:
                raise XltError(f"--out_dir {self.dir}: cannot write there ({e.strerror})") from None
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.lock.seek(0)
                holder, self.lock = self.lock.read().strip() or "?", self.lock.close()
                raise XltError(f"--out_dir {self.dir} is in use by another run (pid {holder}); wait for it, "
                               f"or give this run another --out_dir") from None
            self.lock.truncate(0)
            self.lock.write(f"{os.getpid()}\n")
            self.lock.flush()
            self._clean()
            config = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
                      if k not in self.NOT_RESULTS | set(selectors) | {"argv"}}
            self._fingerprint({"script": script, "config": config}, getattr(args, "restart", False))

    def _clean(self):
        """Remove what a killed save left: .NAME.XXXXXXXX[.tmp] (atomic_file, save_pretrained) and .NAME.old."""
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                if re.fullmatch(r"\..+\.([a-z0-9_]{8}(\.tmp)?|old)", name):
                    path = Path(root) / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    if name in dirs:
                        dirs.remove(name)

    def _fingerprint(self, mine, restart):
        path = self.units / "run.json"
        if restart and self.units.exists():
            shutil.rmtree(self.units)
            for name in ("results.json", "results.md"):
                (self.dir / name).unlink(missing_ok=True)
        theirs = model.read_json(path) if path.is_file() else None
        if theirs == mine:
            return
        if theirs and any(p.name != "run.json" for p in self.units.glob("*.json")):     # finished units
            a, b = theirs.get("config", {}), mine["config"]
            diff = ([f"script {theirs.get('script')} there, {mine['script']} here"] if
                    theirs.get("script") != mine["script"] else [])
            diff += [f"--{k} {a.get(k)} there, {b.get(k)} here" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
            raise XltError(f"--out_dir {self.dir} holds units of another command ({'; '.join(diff)}): use "
                           f"another --out_dir, or add --restart to discard them")
        shutil.rmtree(self.units, ignore_errors=True)      # a command that finished no unit left nothing to keep
        write_json(path, mine)

    def need(self, *encoders):
        """Stop before training unless the file system has room for one checkpoint of each encoder given (one
        per model the run saves; a rough lower bound of what it writes)."""
        nbytes = sum(p.numel() * p.element_size() for enc in encoders for p in enc.state_dict().values())
        if self.rank == 0:
            st = os.statvfs(self.dir)
            if st.f_bavail * st.f_frsize < nbytes:
                raise XltError(f"--out_dir {self.dir}: {st.f_bavail * st.f_frsize / 1e6:.0f} MB free, but this run "
                               f"saves at least {nbytes / 1e6:.0f} MB of models (free space, or --no_save)")

    def done(self, unit):
        """The record of a finished unit (its tensors under 'tensors'), else None. The unit joins the plan."""
        if unit not in self.plan:
            self.plan.append(unit)
        path = self.units / f"{unit}.json"
        if not path.is_file():
            return None
        record = model.read_json(path)          # records are written atomically: a bad one was damaged
        if (self.units / f"{unit}.safetensors").is_file():
            record["tensors"] = model.read_safetensors(self.units / f"{unit}.safetensors")
        print(f"[{self.script}] {unit}: finished in an earlier run, skipped ({path})")
        return record

    def finish(self, unit, record, tensors=None):
        """Publish a unit's record (after its model): from now on it counts as finished. Returns record."""
        if unit not in self.plan:
            self.plan.append(unit)
        if self.rank == 0:
            if tensors:
                model.write_safetensors(tensors, self.units / f"{unit}.safetensors")
            write_json(self.units / f"{unit}.json", record)
        return {**record, "tensors": tensors} if tensors else record

    def progress(self):
        done = [u for u in self.plan if (self.units / f"{u}.json").is_file()]
        return {"done": done, "pending": [u for u in self.plan if u not in done]}

    def close(self):
        if self.lock:
            self.lock.close()                        # closing releases the lock
            self.lock = None


# -------------------- One command-line vocabulary for every script -------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the description as written, and each option's default unless its help says it."""

    def _format_action(self, action):
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS and "default" not in (action.help or "")):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)


def _checked(kind, test, what):
    """An argparse type: kind(text), which must pass test; argparse's error names `what`."""
    def parse(text):
        try:
            if test(value := kind(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text!r} is not a {what}")
    parse.__name__ = what
    return parse


positive_int = _checked(int, lambda v: v >= 1, "positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "non-negative integer")
positive_float = _checked(float, lambda v: v > 0 and v != float("inf"), "positive number")
nonneg_float = _checked(float, lambda v: 0 <= v < float("inf"), "non-negative number")
probability = _checked(float, lambda v: 0 <= v <= 1, "probability in [0, 1]")
fraction = _checked(float, lambda v: 0 <= v < 1, "number in [0, 1)")
rate = _checked(float, lambda v: 0 < v < 1, "number in (0, 1)")
# At least a few words beside the special tokens; below 3 data.tlm_example could never fit a pair.
token_count = _checked(int, lambda v: v >= 8, "number of tokens >= 8")
device_name = _checked(str, lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                       "device (auto, cpu, cuda or cuda:N)")
# A path or hub name: '' would silently mean the current folder (--out_dir) or $XLT_DATA (--data_dir).
nonempty = _checked(str, lambda v: v.strip() != "", "non-empty path or name")
# --langs and friends: 'a,b' (or 'all'); '' or an empty entry ('a,,b') is a typo, not the default, and a repeated
# one ('eng_Latn,eng_Latn') would be trained or scored twice and weigh twice in an average.
name_list = _checked(str, lambda v: all(x.strip() for x in v.split(",")) and len({x.strip() for x in v.split(",")})
                     == len(v.split(",")), "comma-separated list without empty or repeated entries")


def parser(doc):
    """An ArgumentParser whose description is the script's docstring's first line."""
    return argparse.ArgumentParser(description=doc.strip().split("\n")[0] + " (the module docstring says more)",
                                   formatter_class=HelpFormatter)


def add_common_args(p, out_dir, epochs, batch_size, lr, langs_help, max_len=128, log_every=10, seeds=(1,),
                    limit_help="use N training rows, evenly spaced", eval_limit=None):
    """The flags every method script shares, with the same meaning everywhere."""
    p.add_argument("--langs", type=name_list, default=None, help=langs_help)
    p.add_argument("--data_dir", type=nonempty, default=None, help="data folder (default: $XLT_DATA, else "
                   "~/.cache/xlt/data)")
    p.add_argument("--out_dir", type=nonempty, default=out_dir, help="results.json, results.md and the saved models")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=list(seeds), help="one whole experiment per seed; "
                   "results.json has each and their mean and std")
    p.add_argument("--compile", action="store_true", help="torch.compile the Transformer blocks")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    p.add_argument("--batch_size", type=positive_int, default=batch_size, help="sentences per training step")
    p.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.01, help="AdamW's, on matrices only")
    p.add_argument("--warmup", type=fraction, default=0.1, help="fraction of the steps with linear warmup")
    p.add_argument("--max_len", type=token_count, default=max_len, help="subword tokens per input")
    p.add_argument("--dropout", type=fraction, default=None, help="set every dropout probability (default: "
                   "the checkpoint's own, 0.1 for the defaults); 0 makes CPU runs deterministic (on CUDA, "
                   "atomic adds in some kernels still vary from run to run)")
    p.add_argument("--prefix", default="auto", help="text before every input: 'auto' = 'query: ' for "
                   "intfloat/*e5* models (how e5 was trained), nothing for others")
    p.add_argument("--train_embeddings", action="store_true", help="also train the word embeddings "
                   "(frozen by default: their 250k rows dominate a CPU step, and unseen languages should not drift)")
    p.add_argument("--limit", type=positive_int, default=None, help=limit_help)
    p.add_argument("--eval_limit", type=positive_int, default=eval_limit, help="use N rows of every evaluation set, "
                   "evenly spaced" + (" (default: all)" if eval_limit is None else ""))
    p.add_argument("--log_every", type=positive_int, default=log_every, help="steps between logged losses")
    p.add_argument("--no_save", action="store_true", help="save no model (results are still written)")
    p.add_argument("--restart", action="store_true", help="discard the finished units of an earlier command in "
                   "--out_dir (by default the same command resumes there, and a different one is refused)")
    return p


def parse(p, argv):
    """Parse, check what argparse types cannot, and keep the command line for results.json."""
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def check_max_len(max_len, encoder, name):
    """--max_len against a loaded model's position table, which argparse cannot know: RoBERTa numbers real
    tokens from pad + 1 (the offset); BERT numbers the padding too, and data.pad_batch pads to a multiple of 8."""
    c = encoder.config
    limit = c.max_position_embeddings - c.position_offset if c.position_offset else c.max_position_embeddings // 8 * 8
    if max_len > limit:
        raise XltError(f"--max_len {max_len}: {name} has {c.max_position_embeddings} positions, so at most {limit}")


def cli(main):
    """Run a script's main: bad input (XltError), a full or read-only disk, and a file system's refusal of a named
    file (permission denied, a folder where a file belongs, a symlink loop, ...) end in one line on stderr and exit
    status 1; Ctrl-C in one line saying what was kept and how to resume, exit status 130."""
    try:
        main()
    except XltError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        path = e.filename2 or e.filename      # of a rename, the destination
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):          # a full or read-only disk mid-run
            sys.exit(f"error: cannot write {path or 'the output'} ({e.strerror}); {kept()}")
        if not path:                          # names no file: a bug, which keeps its traceback
            raise
        sys.exit(f"error: {path}: {e.strerror}; {kept()}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {kept()}", file=sys.stderr)
        sys.exit(130)


def kept():
    """What an ended run leaves: its finished units, which the same command resumes from."""
    run = RunFolder.active
    if run is None:
        return "nothing was written"
    n = len(run.progress()["done"])
    return f"{n} finished unit{'' if n == 1 else 's'} kept in {run.dir}; the same command resumes"


# -------------------- Languages and prefixes -----------------------------------------------------
def resolve_prefix(arg, model_name):
    """--prefix: 'auto' -> the prefix a training script saved in a checkpoint's config.json ("xlt_prefix",
    the format it was fine-tuned with), else 'query: ' for intfloat/*e5* names (e5's training format), else
    ''. None (evaluate.py's default): the saved prefix, else ''. Any other value is used as it is."""
    cfg = Path(str(model_name)) / "config.json"
    saved = model.read_json(cfg).get("xlt_prefix") if arg in (None, "auto") and cfg.is_file() else None
    if not isinstance(saved, (str, type(None))):
        raise XltError(f"{cfg}: xlt_prefix is {saved!r}, expected a string")
    if arg not in (None, "auto"):
        return arg
    if saved is not None or arg is None:
        return saved or ""
    return "query: " if re.fullmatch(r"intfloat/.*e5.*", str(model_name)) else ""


def available_langs(task, data_dir, split="test"):
    """The languages the data has for task."""
    listers = {"sib200": data.sib200_languages, "tatoeba": data.tatoeba_languages, "nusax": data.nusax_languages,
               "pos": lambda d: sorted(data.ud_pud_files(d)), "xnli": lambda d: sorted(xnli_rows(d, split))}
    return listers[task](data_dir)


def resolve_langs(arg, task, data_dir, split="test", flag="langs", default=None):
    """--langs (or the option named `flag`): a comma-separated list, 'all', or None for `default` (else
    the task's default). Each language is checked against the data."""
    if arg is None:
        default = default or {"sib200": DEFAULT_SIB200_LANGS, "tatoeba": DEFAULT_TATOEBA_LANGS}.get(task)
        return list(default or available_langs(task, data_dir, split))
    have = available_langs(task, data_dir, split)
    if arg == "all":
        return have
    langs = [lang.strip() for lang in arg.split(",") if lang.strip()]
    if not langs:
        raise XltError(f"--{flag} is empty")
    bad = [lang for lang in langs if lang not in have]
    if bad:
        example = {"sib200": "FLORES-200 codes like eng_Latn, zho_Hans", "tatoeba": "ISO 639-3 codes like deu, "
                   "cmn, swh", "nusax": "names like javanese, english", "pos": "ISO 639-1 codes like de, zh",
                   "xnli": "XNLI codes like de, zh"}[task]
        raise XltError(f"--{flag}: {task} has no language {', '.join(bad)} ({example}; --{flag} all uses "
                       f"all {len(have)})")
    return langs


# -------------------- Command line ---------------------------------------------------------------
def load_finetuned(path, task):
    """(encoder, head, tokenizer) of a directory saved with save_pretrained(..., head=...), its head fit for task."""
    resolved = model.resolve_checkpoint(path)
    if not resolved.is_dir():
        raise XltError(f"--model {path}: --task {task} needs a fine-tuned directory with a task head; "
                       f"{path} is a plain encoder")
    encoder, head, cfg = model.load_with_head(resolved)
    want = {"sib200": ("sequence", len(data.SIB200_LABELS)), "nusax": ("sequence", len(data.NUSAX_LABELS)),
            "xnli": ("sequence", 3), "pos": ("token", len(data.UPOS_TAGS))}[task]
    spec = cfg["xlt_head"]
    if (spec["type"], spec["num_labels"]) != want:
        raise XltError(f"--model {path}: its head is a {spec['type']} head with {spec['num_labels']} labels, "
                       f"but --task {task} needs a {want[0]} head with {want[1]}")
    return encoder, head, data.load_tokenizer(resolved)


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Zero-shot cross-lingual evaluation of a "
                                "fine-tuned classifier/tagger (sib200, pos, nusax, xnli) or of retrieval (tatoeba).")
    p.add_argument("--model", type=nonempty, required=True, help="hub name or directory; sib200/pos/nusax/xnli need a "
                   "directory saved with a task head (save_pretrained(..., head=...))")
    p.add_argument("--task", required=True, choices=("sib200", "tatoeba", "pos", "nusax", "xnli"),
                   help="what to evaluate")
    p.add_argument("--langs", type=name_list, default=None, help="comma-separated codes, or 'all'. sib200: FLORES "
                   "codes (default: DEFAULT_SIB200_LANGS); tatoeba: ISO 639-3 codes (default: DEFAULT_TATOEBA_LANGS); "
                   "pos: ISO 639-1 codes of UD PUD; nusax: language names; xnli: XNLI codes (default: all)")
    p.add_argument("--split", default="test", choices=("test", "dev"), help="sib200, nusax, xnli")
    p.add_argument("--per_layer", action="store_true", help="tatoeba: also xx->en per hidden state (embeddings first)")
    p.add_argument("--prefix", default=None, help="text before every input sentence (default: the "
                   "'xlt_prefix' saved in a fine-tuned checkpoint, else none); 'auto': 'query: ' for intfloat/*e5*")
    p.add_argument("--out", type=nonempty, default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--data_dir", type=nonempty, default=None, help="data folder (default: $XLT_DATA, else "
                   "~/.cache/xlt/data)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--eval_limit", type=positive_int, default=None, help="use N rows (pairs, sentences) of "
                   "every set, evenly spaced (default: all)")
    p.add_argument("--max_len", type=token_count, default=None, help="subword tokens per input (default: 256 "
                   "for pos, where a sentence is cut only rarely, else 128)")
    args = p.parse_args(argv)
    t0, device, data_dir = time.time(), model.pick_device(args.device), data.resolve_data_dir(args.data_dir)
    max_len = (256 if args.task == "pos" else 128) if args.max_len is None else args.max_len
    prefix = resolve_prefix(args.prefix, args.model)
    if prefix and args.task == "pos":
        raise XltError(f"--prefix {prefix!r} does not apply to pos (its inputs are pre-split words)")
    if args.per_layer and args.task != "tatoeba":
        raise XltError("--per_layer applies to --task tatoeba only")
    langs = resolve_langs(args.langs, args.task, data_dir, args.split)
    result = {"task": args.task, "model": str(args.model), "prefix": prefix}
    if args.task == "tatoeba":
        encoder, tok = model.Encoder.from_pretrained(args.model).to(device), data.load_tokenizer(args.model)
        check_max_len(max_len, encoder, args.model)
        details = tatoeba(encoder, tok, data_dir, langs, device, args.per_layer, args.eval_limit, prefix, max_len)
        scores, en_xx, sizes, curves = ({lang: d[key] for lang, d in details.items()}
                                        for key in ("xx->en", "en->xx", "n", "per_layer"))
        result.update(directions={lang: {"xx->en": round(scores[lang], 1), "en->xx": round(en_xx[lang], 1)}
                                  for lang in details}, sizes=sizes)
        print(f"[evaluate] Tatoeba top-1, prefix {prefix!r}, device {device}")
        print(markdown_table({"xx->en": scores, "en->xx": en_xx}, row_name=str(args.model)))
        if args.per_layer:
            result["per_layer"] = {lang: [round(v, 1) for v in curve] for lang, curve in curves.items()}
            print("\nper-layer xx->en top-1 (mean pooling of each hidden state):\n"
                  + per_layer_table({str(args.model): curves}))
    else:
        encoder, head, tok = load_finetuned(args.model, args.task)
        check_max_len(max_len, encoder, args.model)
        encoder, head = encoder.to(device), head.to(device)
        if args.task == "pos":
            scores = pos_scores(encoder, head, tok, data_dir, langs, device, max_len, args.eval_limit)
        else:
            sets = (xnli_rows(data_dir, args.split) if args.task == "xnli" else
                    {lang: (data.read_sib200 if args.task == "sib200" else data.read_nusax)(data_dir, lang, args.split)
                     for lang in langs})
            sets = {lang: data.subset(sets[lang], args.eval_limit) for lang in langs}
            scores = classification_scores(encoder, head, tok, sets, device, max_len, prefix,
                                           "macro_f1" if args.task == "nusax" else "accuracy",
                                           f"{args.task} {args.split}")
            result["split"] = args.split
        result["metric"] = "macro-F1" if args.task == "nusax" else "accuracy"
        train_lang = {"sib200": "eng_Latn", "pos": "en", "nusax": "english", "xnli": "en"}[args.task]
        print(f"[evaluate] {args.task} {args.split} {result['metric']}")
        print(markdown_table({str(args.model): scores}, train_lang=train_lang if train_lang in scores else None,
                             row_name="model"))
    result.update(scores={lang: round(v, 1) for lang, v in scores.items()}, average=round(_mean(scores.values()), 1),
                  seconds=round(time.time() - t0, 1))
    if args.out:
        write_json(args.out, result)
        print(f"[evaluate] wrote {args.out}")
    return result


if __name__ == "__main__":
    cli(main)
