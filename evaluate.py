"""evaluate.py: how xlt measures cross-lingual transfer. Every number in a results table comes from here.

The story, top to bottom:
  1. Which languages. `DEFAULT_SIB200_LANGS`: 14 SIB-200 languages chosen to be typologically diverse
     (English, where the classifiers are trained, and 13 others in eight scripts, high- and low-resource).
  2. Metrics on label lists: `accuracy` and `macro_f1`, both in percent.
  3. Zero-shot classification: `predict_classes` runs a fine-tuned encoder + head over encoded examples
     (sorted by length so that batches carry little padding, returned in the original order);
     `sib200_scores`, `nusax_scores` and `xnli_scores` give {language: percent} on a test set.
  4. Zero-shot POS tagging: `predict_tags`, `pos_accuracy` (UPOS accuracy over words: the prediction at
     a word's first subword) and `pos_scores` over the UD PUD test sets.
  5. Sentence retrieval, no fine-tuning at all: `embed` mean-pools token states (last layer, or every
     hidden state), `retrieval_top1` finds each sentence's nearest neighbour by cosine similarity, and
     `tatoeba_scores` measures it on LASER's Tatoeba test set (Artetxe & Schwenk 2019), optionally per
     layer: how the cross-lingual alignment of the representations changes with depth.
  6. Reporting: `markdown_table` (rows = methods, columns = languages, the average, and the average
     without the training language: the zero-shot average) and the atomic `write_json`.
  7. A command line that evaluates a saved classifier / tagger, or the retrieval of any encoder:

    python evaluate.py --model out/finetune/best --task sib200                 # DEFAULT_SIB200_LANGS
    python evaluate.py --model intfloat/multilingual-e5-small --task tatoeba --langs deu,fra,rus,cmn,swh
    python evaluate.py --model intfloat/multilingual-e5-small --task tatoeba --langs deu --per_layer
    python evaluate.py --model out/pos/best --task pos --langs all --out out/pos/pud.json

Conventions (ours, stated so that numbers can be compared):
  - Tatoeba: the score of a language is the xx->en top-1 accuracy (each foreign sentence retrieves its
    English translation among all English sentences of that language's file), as XTREME reports it.
    The JSON also holds both directions ("directions": {lang: {"xx->en", "en->xx"}}). Row i of the
    foreign file translates row i of the English file; a neighbour is right only if it is that row.
  - multilingual-e5 was trained with a "query: " or "passage: " prefix on every input, and its model
    card advises "query: " for bitext mining. We measured it (4-bit e5-small, full Tatoeba sets, top-1
    xx->en / en->xx, mean pooling of the last layer):
        prefix      deu        fra        rus        cmn        swh        avg xx->en
        none        98.5/97.1  92.6/93.7  92.1/92.5  92.1/90.8  76.4/81.3  90.3
        "query: "   98.0/96.2  92.2/92.8  92.3/90.8  91.6/89.3  73.3/75.9  89.5
    No prefix is better in 9 of 10 cells (and on amh, 168 pairs: 83.9 vs 82.1 xx->en), and at almost
    every layer of the per-layer curves (by up to 24 points in the lower and middle layers, where the
    shared prefix tokens weigh most in the mean), so the default is no prefix. `--prefix auto`
    gives "query: " to intfloat/*e5* names and nothing to other models; the prefix used is printed and
    written to the JSON. A fine-tuned classifier should be evaluated with the prefix it was trained with.
  - POS accuracy counts every word of the treebank: a word that was cut off by max_len or that the
    tokenizer maps to nothing counts as wrong (so truncation cannot inflate the score).
  - SIB-200 and XNLI report accuracy; NusaX reports macro-F1, as the NusaX paper does.
  - Scores are percentages; the JSON rounds them to one decimal, averages are taken before rounding.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import model
from model import XltError

# ----------------------------------------------------------------------------------------------------
# 1. Which languages
# ----------------------------------------------------------------------------------------------------

# Typologically diverse on purpose, so that an average is not an average of English's close relatives:
#   eng_Latn          the training language (every fine-tuning script trains on English)
#   deu, fra, spa     high-resource Indo-European languages in Latin script, close to English
#   rus_Cyrl          Slavic, Cyrillic script
#   zho_Hans, jpn_Jpan  no spaces between words; Han characters (+ kana)
#   arb_Arab          Semitic, right-to-left Arabic script
#   hin_Deva          Indo-Aryan, Devanagari
#   tur_Latn          agglutinative, Turkic
#   tha_Thai          Thai script, no spaces between words
#   swh_Latn, yor_Latn  lower-resource African languages: Swahili (Bantu), Yoruba (tonal, diacritics)
#   amh_Ethi          low-resource Semitic language in Ge'ez script, a script most tokenizers cover poorly
DEFAULT_SIB200_LANGS = ["eng_Latn", "deu_Latn", "fra_Latn", "spa_Latn", "rus_Cyrl", "zho_Hans", "jpn_Jpan",
                        "arb_Arab", "hin_Deva", "tur_Latn", "tha_Thai", "swh_Latn", "yor_Latn", "amh_Ethi"]

# The same languages in Tatoeba's codes (Yoruba has no Tatoeba set; English is the pivot of every pair).
DEFAULT_TATOEBA_LANGS = ["deu", "fra", "spa", "rus", "cmn", "jpn", "ara", "hin", "tur", "tha", "swh", "amh"]


# ----------------------------------------------------------------------------------------------------
# 2. Metrics
# ----------------------------------------------------------------------------------------------------

def accuracy(preds, labels):
    """Percentage of positions where the prediction equals the label."""
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy: no examples")
    return 100.0 * sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds, labels, num_labels):
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), in percent.

    Convention: a class that occurs neither among the labels nor among the predictions has no F1 (0/0)
    and is skipped, so a test set without some class is not penalised for it. A class that is in the
    labels but never predicted (or predicted but never right) has F1 = 0 and counts."""
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"macro_f1: {len(preds)} predictions but {len(labels)} labels")
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    if not f1s:
        raise ValueError("macro_f1: no examples")
    return 100.0 * sum(f1s) / len(f1s)


# ----------------------------------------------------------------------------------------------------
# 3. Zero-shot classification
# ----------------------------------------------------------------------------------------------------

def length_batches(examples, batch_size):
    """Index batches in order of length: similar lengths share a batch, so padding (wasted compute) is
    small. Evaluation needs no randomness, so a plain sort is enough (no bucketing as in training)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class _evaluating:
    """Eval mode (no dropout) and no autograd inside; afterwards every submodule gets back its own mode,
    so a training loop can call the evaluation in the middle of an epoch."""

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.modes = [(sub, sub.training) for m in self.modules for sub in m.modules()]
        for m in self.modules:
            m.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for sub, mode in self.modes:
            sub.training = mode


def _argmax_batches(encoder, head, examples, pad_id, device, batch_size):
    """(indices into examples, the head's argmax for each as a list) per length-sorted batch."""
    device = torch.device(device)
    with _evaluating(encoder, head):
        for idx in length_batches(examples, batch_size):
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad_id), device)
            with model.autocast(device):
                h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                yield idx, head(h, batch["attention_mask"]).argmax(-1).tolist()


def predict_classes(encoder, head, examples, pad_id, device, batch_size=64):
    """Predicted class ids of examples ({'input_ids', 'token_type_ids'} from data.encode), in their order."""
    preds = [None] * len(examples)
    for idx, classes in _argmax_batches(encoder, head, examples, pad_id, device, batch_size):
        for i, c in zip(idx, classes):
            preds[i] = c
    return preds


def classification_scores(encoder, head, tok, sets, device, max_len=128, batch_size=64, prefix="",
                          metric="accuracy", desc="eval"):
    """{name: percent} for sets = {name: rows}, a row being {'text', 'label'} or {'text_a', 'text_b',
    'label'} (a sentence pair). metric: 'accuracy' or 'macro_f1' (over the head's classes)."""
    pad_id = data.special_ids(tok)["pad"]
    scores = {}
    for name, rows in tqdm(sets.items(), desc=desc, leave=False):
        if not rows:
            raise data.DataError(f"{desc}: {name} has no examples")
        examples = data.encode_rows(tok, rows, max_len, prefix)
        preds = predict_classes(encoder, head, examples, pad_id, device, batch_size)
        labels = [ex["label"] for ex in examples]
        scores[name] = (macro_f1(preds, labels, head.num_labels) if metric == "macro_f1"
                        else accuracy(preds, labels))
    return scores


def sib200_scores(encoder, head, tok, data_dir, langs, device, split="test", max_len=128, batch_size=64,
                  prefix=""):
    """{FLORES code: accuracy} of a 7-way topic classifier on SIB-200 (Adelani et al. 2024)."""
    sets = {lang: data.read_sib200(data_dir, lang, split) for lang in langs}
    return classification_scores(encoder, head, tok, sets, device, max_len, batch_size, prefix,
                                 desc=f"SIB-200 {split}")


def nusax_scores(encoder, head, tok, data_dir, langs, device, split="test", max_len=128, batch_size=64,
                 prefix=""):
    """{language: macro-F1} of a 3-way sentiment classifier on NusaX-Senti (Winata et al. 2023), the
    metric the NusaX paper reports."""
    sets = {lang: data.read_nusax(data_dir, lang, split) for lang in langs}
    return classification_scores(encoder, head, tok, sets, device, max_len, batch_size, prefix,
                                 metric="macro_f1", desc=f"NusaX {split}")


def xnli_file(data_dir, split="test"):
    """XNLI 1.0's xnli.{dev,test}.tsv (all languages in one file, a 'language' column). XNLI is not part
    of the shared data (no clean public copy, and its license is CC BY-NC): put the file there yourself."""
    path = data.resolve_data_dir(data_dir) / "xnli" / f"xnli.{split}.tsv"
    if not path.is_file():
        raise data.DataError(f"{path} does not exist; XNLI is not downloaded by data.py: put XNLI-1.0's "
                             f"xnli.{split}.tsv there (https://cims.nyu.edu/~sbowman/xnli/)")
    return path


def read_xnli(path):
    """{language: [{'text_a', 'text_b', 'label'}]} from an XNLI 1.0 TSV (data.read_pair_tsv for the
    columns; the 'language' column is read here, skipping blank lines exactly as read_pair_tsv does)."""
    rows = data.read_pair_tsv(path)
    lines = [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    header = lines[0].rstrip("\r").split("\t")
    if "language" not in header:
        raise data.DataError(f"{path} line 1: no 'language' column (expected XNLI 1.0's xnli.test.tsv)")
    col = header.index("language")
    out = {}
    for line, row in zip(lines[1:], rows):
        out.setdefault(line.split("\t")[col], []).append(row)
    return out


def xnli_scores(encoder, head, tok, data_dir, langs, device, split="test", max_len=128, batch_size=64,
                prefix=""):
    """{XNLI language code: accuracy} of a 3-way NLI classifier (Conneau et al. 2018)."""
    path = xnli_file(data_dir, split)
    by_lang = read_xnli(path)
    missing = [lang for lang in langs if lang not in by_lang]
    if missing:
        raise data.DataError(f"{path}: no language {', '.join(missing)} (it has {', '.join(sorted(by_lang))})")
    return classification_scores(encoder, head, tok, {lang: by_lang[lang] for lang in langs}, device,
                                 max_len, batch_size, prefix, desc=f"XNLI {split}")


# ----------------------------------------------------------------------------------------------------
# 4. Zero-shot POS tagging
# ----------------------------------------------------------------------------------------------------

def predict_tags(encoder, head, examples, pad_id, device, batch_size=64):
    """Per example, the predicted tag id at every token position (a list as long as its input_ids)."""
    preds = [None] * len(examples)
    for idx, tags in _argmax_batches(encoder, head, examples, pad_id, device, batch_size):
        for i, t in zip(idx, tags):
            preds[i] = t[:len(examples[i]["input_ids"])]      # drop the padding positions
    return preds


def pos_accuracy(encoder, head, tok, sentences, device, max_len=256, batch_size=64):
    """UPOS accuracy (percent) over the words of sentences ([{'words', 'upos'}] from data.read_conllu).
    A word is tagged by the prediction at its first subword (positions labelled -100 are not words).
    The denominator is every word: words cut off by max_len or tokenized to nothing count as wrong."""
    pad_id = data.special_ids(tok)["pad"]
    examples = data.encode_tagged(tok, [s["words"] for s in sentences], [s["upos"] for s in sentences], max_len)
    preds = predict_tags(encoder, head, examples, pad_id, device, batch_size)
    correct = sum(p == y for ex, pred in zip(examples, preds) for p, y in zip(pred, ex["labels"]) if y != -100)
    words = sum(len(s["words"]) for s in sentences)
    if not words:
        raise ValueError("pos_accuracy: no words")
    return 100.0 * correct / words


def pos_scores(encoder, head, tok, data_dir, langs, device, max_len=256, batch_size=64):
    """{ISO 639-1 code: UPOS accuracy} on the UD PUD test sets (the same 1,000 sentences in every language)."""
    files = data.ud_pud_files(data_dir)
    missing = [lang for lang in langs if lang not in files]
    if missing:
        raise data.DataError(f"no UD PUD test set for {', '.join(missing)} (there are: {', '.join(sorted(files))})")
    return {lang: pos_accuracy(encoder, head, tok, data.read_conllu(files[lang]), device, max_len, batch_size)
            for lang in tqdm(langs, desc="UD PUD", leave=False)}


# ----------------------------------------------------------------------------------------------------
# 5. Sentence retrieval
# ----------------------------------------------------------------------------------------------------

def embed(encoder, tok, texts, device, batch_size=64, max_len=128, all_layers=False, prefix=""):
    """Sentence vectors: the mean of the non-pad token states (model.mean_pool), float32 on the CPU.
    Last layer -> (N, H); all_layers -> (L+1, N, H), index 0 the embedding output, index l layer l."""
    device = torch.device(device)
    pad_id = data.special_ids(tok)["pad"]
    examples = data.encode(tok, [prefix + t for t in texts], max_len)
    n_states = encoder.config.num_hidden_layers + 1 if all_layers else 1
    out = torch.zeros(n_states, len(examples), encoder.config.hidden_size)
    with _evaluating(encoder):
        for idx in length_batches(examples, batch_size):
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad_id), device)
            with model.autocast(device):
                hs = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                             output_hidden_states=all_layers)
            hs = hs if all_layers else [hs]
            for layer, h in enumerate(hs):
                out[layer, idx] = model.mean_pool(h.float(), batch["attention_mask"]).cpu()
    return out if all_layers else out[0]


def retrieval_top1(src, tgt):
    """(src->tgt, tgt->src) top-1 accuracy in percent: row i of src is the translation of row i of tgt;
    each row's nearest neighbour on the other side by cosine similarity must be its own translation."""
    if src.shape != tgt.shape:
        raise ValueError(f"retrieval_top1: src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must match")
    sim = torch.nn.functional.normalize(src.float(), dim=-1) @ torch.nn.functional.normalize(tgt.float(), dim=-1).T
    gold = torch.arange(len(src))
    return (100.0 * (sim.argmax(1) == gold).float().mean().item(),
            100.0 * (sim.argmax(0) == gold).float().mean().item())


def tatoeba_details(encoder, tok, data_dir, langs, device, per_layer=False, prefix="", batch_size=64,
                    max_len=128):
    """{lang: {'xx->en', 'en->xx', 'n', 'per_layer' (xx->en per hidden state, or None)}} on Tatoeba."""
    out = {}
    for lang in tqdm(langs, desc="Tatoeba", leave=False):
        foreign, english = data.read_tatoeba(data_dir, lang)
        x = embed(encoder, tok, foreign, device, batch_size, max_len, all_layers=per_layer, prefix=prefix)
        e = embed(encoder, tok, english, device, batch_size, max_len, all_layers=per_layer, prefix=prefix)
        if per_layer:
            curve = [retrieval_top1(x[layer], e[layer])[0] for layer in range(len(x))]
            x, e = x[-1], e[-1]
        xx_en, en_xx = retrieval_top1(x, e)
        out[lang] = {"xx->en": xx_en, "en->xx": en_xx, "n": len(foreign), "per_layer": curve if per_layer else None}
    return out


def tatoeba_scores(encoder, tok, data_dir, langs, device, per_layer=False, prefix="", batch_size=64, max_len=128):
    """(scores, per_layer): scores {lang: xx->en top-1 percent} (XTREME's number; tatoeba_details has both
    directions), per_layer {lang: [xx->en percent per hidden state, embeddings first]} or {}."""
    details = tatoeba_details(encoder, tok, data_dir, langs, device, per_layer, prefix, batch_size, max_len)
    scores = {lang: d["xx->en"] for lang, d in details.items()}
    return scores, ({lang: d["per_layer"] for lang, d in details.items()} if per_layer else {})


# ----------------------------------------------------------------------------------------------------
# 6. Reporting
# ----------------------------------------------------------------------------------------------------

def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def markdown_table(results, train_lang=None, digits=1, row_name="method"):
    """A markdown table: rows = methods (or models), columns = languages (in order of first appearance),
    then 'avg' over the row's languages and, with train_lang, 'zero-shot avg' without train_lang.
    `results` is {row: {lang: percent}}, or a single row {lang: percent}. A missing cell prints '-'."""
    if results and all(isinstance(v, (int, float)) for v in results.values()):
        results = {"score": results}
    langs = []
    for row in results.values():
        langs += [lang for lang in row if lang not in langs]
    header = [row_name] + langs + ["avg"] + (["zero-shot avg"] if train_lang else [])

    def fmt(v):
        return "-" if v is None else f"{v:.{digits}f}"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, row in results.items():
        cells = [row.get(lang) for lang in langs] + [_mean(row.values())]
        if train_lang:
            cells.append(_mean(v for lang, v in row.items() if lang != train_lang))
        lines.append("| " + " | ".join([str(name)] + [fmt(v) for v in cells]) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    """Write obj as JSON (indent 2) atomically: a temporary file in the same folder, then os.replace, so
    a reader never sees half a file and an interrupted run leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~model.current_umask())        # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------------

TASKS = ("sib200", "tatoeba", "pos", "nusax", "xnli")
E5_PREFIX = "query: "


def resolve_prefix(arg, model_name):
    """--prefix: 'auto' -> 'query: ' for intfloat/*e5* model names (e5's training format), else ''.
    Not given (None): the prefix a training script saved in the checkpoint's config.json ("xlt_prefix",
    the format the model was fine-tuned with), else ''."""
    if arg is None:
        cfg = Path(str(model_name)) / "config.json"
        return json.loads(cfg.read_text()).get("xlt_prefix", "") if cfg.is_file() else ""
    if arg != "auto":
        return arg
    return E5_PREFIX if re.fullmatch(r"intfloat/.*e5.*", str(model_name)) else ""


def available_langs(task, data_dir, split="test"):
    if task == "sib200":
        return data.sib200_languages(data_dir)
    if task == "tatoeba":
        return data.tatoeba_languages(data_dir)
    if task == "pos":
        return sorted(data.ud_pud_files(data_dir))
    if task == "nusax":
        return data.nusax_languages(data_dir)
    return sorted(read_xnli(xnli_file(data_dir, split)))


def resolve_langs(arg, task, data_dir, split="test", flag="langs"):
    """--langs (or the option named `flag`, for the errors): a comma-separated list, 'all', or None for
    the task's default."""
    if arg is None:
        if task == "sib200":
            return list(DEFAULT_SIB200_LANGS)
        if task == "tatoeba":
            return list(DEFAULT_TATOEBA_LANGS)
        return available_langs(task, data_dir, split)
    if arg == "all":
        return available_langs(task, data_dir, split)
    langs = [lang.strip() for lang in arg.split(",") if lang.strip()]
    if not langs:
        raise XltError(f"--{flag} is empty")
    if task in ("sib200", "tatoeba", "nusax"):   # pos and xnli check their languages themselves
        have = set(available_langs(task, data_dir, split))
        bad = [lang for lang in langs if lang not in have]
        if bad:
            example = {"sib200": "FLORES-200 codes like eng_Latn, zho_Hans", "tatoeba": "ISO 639-3 codes like "
                       "deu, cmn, swh", "nusax": "names like javanese, english"}[task]
            raise XltError(f"--{flag}: {task} has no language {', '.join(bad)} ({example}; --{flag} all uses "
                           f"all {len(have)})")
    return langs


def load_finetuned(path, task):
    """(encoder, head, tokenizer) of a directory saved with save_pretrained(..., head=...), checking that
    the head fits the task."""
    resolved = model.resolve_checkpoint(path)
    if not resolved.is_dir():
        raise XltError(f"--model {path}: --task {task} needs a fine-tuned directory with a task head "
                       f"(saved by save_pretrained(..., head=...)); {path} is a plain encoder")
    encoder, head, cfg = model.load_with_head(resolved)
    want = {"sib200": ("sequence", len(data.SIB200_LABELS)), "nusax": ("sequence", len(data.NUSAX_LABELS)),
            "xnli": ("sequence", 3), "pos": ("token", len(data.UPOS_TAGS))}[task]
    spec = cfg["xlt_head"]
    if (spec["type"], spec["num_labels"]) != want:
        raise XltError(f"--model {path}: its head is a {spec['type']} head with {spec['num_labels']} labels, "
                       f"but --task {task} needs a {want[0]} head with {want[1]}")
    return encoder, head, data.load_tokenizer(resolved)


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=model.HelpFormatter, description="Zero-shot cross-lingual evaluation of a fine-tuned classifier/"
                                "tagger (sib200, pos, nusax, xnli) or of any encoder's sentence retrieval "
                                "(tatoeba).")
    p.add_argument("--model", required=True, help="hub name or directory; sib200/pos/nusax/xnli need a "
                   "directory saved with a task head (save_pretrained(..., head=...))")
    p.add_argument("--task", required=True, choices=TASKS, help="what to evaluate")
    p.add_argument("--langs", default=None, help="comma-separated codes, or 'all'. sib200: FLORES codes "
                   "(default: the 14 of DEFAULT_SIB200_LANGS); tatoeba: ISO 639-3 codes such as deu,cmn "
                   f"(default: {','.join(DEFAULT_TATOEBA_LANGS)}); pos: ISO 639-1 codes of UD PUD (default: "
                   "all); nusax: language names (default: all); xnli: XNLI codes (default: all)")
    p.add_argument("--split", default="test", help="test (default) or dev (sib200, nusax, xnli)")
    p.add_argument("--per_layer", action="store_true", help="tatoeba: also the xx->en accuracy of every hidden "
                   "state (embedding output first)")
    p.add_argument("--prefix", default=None, help="text put before every input sentence (default: the "
                   "'xlt_prefix' a training script saved in a fine-tuned checkpoint, else none, which measured "
                   "better than e5's 'query: ' on Tatoeba, see the docstring). 'auto': 'query: ' for "
                   "intfloat/*e5* names, nothing for other models")
    p.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--data_dir", default=None, help="data folder (default: $XLT_DATA, else ~/.cache/xlt/data)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    p.add_argument("--max_len", type=int, default=None, help="subword tokens per input (default: 256 for "
                   "pos, where a sentence is cut only rarely, else 128)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise XltError(f"--batch_size must be >= 1, got {args.batch_size}")
    t0 = time.time()
    device = model.pick_device(args.device)
    data_dir = data.resolve_data_dir(args.data_dir)
    max_len = args.max_len or (256 if args.task == "pos" else 128)
    prefix = resolve_prefix(args.prefix, args.model)
    if prefix and args.task == "pos":
        raise XltError(f"--prefix {prefix!r} does not apply to pos (its inputs are pre-split words)")
    langs = resolve_langs(args.langs, args.task, data_dir, args.split)
    if args.per_layer and args.task != "tatoeba":
        raise XltError("--per_layer applies to --task tatoeba only")
    result = {"task": args.task, "model": str(args.model)}
    if args.task == "tatoeba":
        encoder = model.Encoder.from_pretrained(args.model).to(device)
        tok = data.load_tokenizer(args.model)
        print(f"[evaluate] Tatoeba xx->en top-1, prefix {prefix!r}, device {device}")
        details = tatoeba_details(encoder, tok, data_dir, langs, device, args.per_layer, prefix,
                                  args.batch_size, max_len)
        scores = {lang: d["xx->en"] for lang, d in details.items()}
        result.update(scores=scores, average=_mean(scores.values()), prefix=prefix,
                      directions={lang: {"xx->en": round(d["xx->en"], 1), "en->xx": round(d["en->xx"], 1)}
                                  for lang, d in details.items()},
                      sizes={lang: d["n"] for lang, d in details.items()})
        if args.per_layer:
            result["per_layer"] = {lang: [round(v, 1) for v in d["per_layer"]] for lang, d in details.items()}
        print(markdown_table({"xx->en": scores, "en->xx": {lang: d["en->xx"] for lang, d in details.items()}},
                             row_name=str(args.model)))
        if args.per_layer:
            layers = {("emb" if i == 0 else f"layer {i}"): {lang: d["per_layer"][i] for lang, d in details.items()}
                      for i in range(len(next(iter(details.values()))["per_layer"]))}
            print("\nper-layer xx->en top-1 (mean pooling of each hidden state):")
            print(markdown_table(layers, row_name="hidden state"))
    else:
        encoder, head, tok = load_finetuned(args.model, args.task)
        encoder, head = encoder.to(device), head.to(device)
        common = dict(device=device, batch_size=args.batch_size)
        if args.task == "pos":
            scores = pos_scores(encoder, head, tok, data_dir, langs, max_len=max_len, **common)
        else:
            fn = {"sib200": sib200_scores, "nusax": nusax_scores, "xnli": xnli_scores}[args.task]
            scores = fn(encoder, head, tok, data_dir, langs, split=args.split, max_len=max_len, prefix=prefix,
                        **common)
            result.update(split=args.split, prefix=prefix)
        metric = "macro-F1" if args.task == "nusax" else "accuracy"
        result.update(scores=scores, average=_mean(scores.values()), metric=metric)
        train_lang = {"sib200": "eng_Latn", "pos": "en", "nusax": "english", "xnli": "en"}[args.task]
        print(f"[evaluate] {args.task} {args.split} {metric}")
        print(markdown_table({str(args.model): scores}, train_lang=train_lang if train_lang in scores else None,
                             row_name="model"))
    result["scores"] = {lang: round(v, 1) for lang, v in result["scores"].items()}
    result["average"] = round(result["average"], 1)
    result["seconds"] = round(time.time() - t0, 1)
    if args.out:
        write_json(args.out, result)
        print(f"[evaluate] wrote {args.out}")
    print(f"[evaluate] {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    try:
        main()
    except XltError as e:
        sys.exit(f"error: {e}")
