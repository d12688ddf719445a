"""distill.py: can a monolingual teacher make a multilingual student better in languages it never saw labels for?

Paper: Zewen Chi, Li Dong, Furu Wei, Xian-Ling Mao, Heyan Huang (2020), "Can Monolingual Pretrained Models
Help Cross-Lingual Classification?", AACL-IJCNLP 2020, pages 12-17 (arXiv:1911.03913). From its abstract:
multilingual pre-training lags behind monolingual models because the capacity is shared by many
languages; the paper presents two approaches that transfer knowledge from a monolingual pretrained model
to a multilingual one, and both beat vanilla multilingual fine-tuning on two zero-shot cross-lingual
classification benchmarks. We could not read the full text. The two approaches below are the *standard*
output-level and representation-level knowledge distillation, not a reconstruction of the paper's
equations, and every hyperparameter here is our choice.

The experiment in five lines:
  1. teacher: fine-tune the monolingual model (English) on the English training set.
  2. baseline: fine-tune the multilingual student on the same English data (vanilla fine-tuning).
  3. approach 1, output distillation: the student also matches the teacher's softened class distribution.
  4. approach 2, representation distillation: the student's sentence vector, through a learned linear map,
     is pulled to the teacher's, alongside the task loss.
  5. evaluate all four zero-shot on English + other languages; model selection on the English dev set only.

The equations (z = logits, y = gold label, p^T = softmax(z / T), h = mean-pooled last layer):
  baseline / teacher   L = CE(y, p_s)
  approach 1           L = (1 - a) CE(y, p_s) + a T^2 KL(p_t^T || p_s^T)           (Hinton et al. 2015)
                       The T^2 keeps the gradient of the KL term, T (p_s^T - p_t^T), at the same scale
                       as T grows (it would otherwise shrink like 1/T^2), so `a` means the same at any T.
  approach 2           L = CE(y, p_s) + b ||W h_s + c - h~_t||^2 / d_t
                       h~_t: the teacher's vector, centred and divided by its RMS deviation over the
                       training set (one scalar), so the term is a fraction of the teacher's variance;
                       W (d_t x d_s), c: a linear map trained with the student, so widths may differ.

Our choices (none of them is from the paper):
  - Default models: teacher sentence-transformers/all-MiniLM-L6-v2 (English only), student
    intfloat/multilingual-e5-small (~100 languages), both embedded offline; task SIB-200 topic
    classification (7 classes; 701 English training sentences), zero-shot on evaluate.DEFAULT_SIB200_LANGS.
    The paper used other models and benchmarks (its abstract does not name them).
  - Hyperparameters: a = 0.5, T = 2 (common values, not tuned), b = 0.1; 4 epochs, batch 32, lr 1e-4 (for
    every model), AdamW with weight decay 0.01 (none on biases and LayerNorm), 10% linear warmup then
    linear decay, gradient-norm clipping at 1.0, max length 128, mean pooling, the English dev epoch with
    the best accuracy kept. b was chosen on English dev (seed 1) among 1 and 0.1: with b = 1 the
    representation term dominates the encoder's gradient early and the task is learned late (dev accuracy
    30, 56, 75, 85 over the 4 epochs; 58, 84, 88, 89 with b = 0.1; the baseline's 53, 79, 87, 87).
  - The teacher is frozen after fine-tuning and run in eval mode (no dropout), so its outputs are a fixed
    function of each sentence: we precompute its logits and pooled vectors for the training set once.
    That is exact (no approximation) and saves one teacher forward pass per student step. The teacher
    saw these very labels, so its distribution on them is sharper than on unseen text; T softens it.
  - Approach 2 distils the final sentence vector (the one the classifier reads) of the fine-tuned
    teacher. The teacher vectors are centred and scaled by one number (their RMS deviation over the
    training set), so the loss is a fraction of the teacher's variance and b means the same for any
    teacher, while the teacher's geometry is kept (five directions hold 83% of the fine-tuned MiniLM's
    variance; scaling every dimension to unit variance would inflate the rest, mostly noise).
    W starts at the ridge least-squares map from the *pretrained* student's vectors to the teacher's (a
    short run cannot learn a fresh 384 x 384 map at lr 1e-4), so the loss at step 0 is what the student
    itself still has to change. The ridge, 1.0 x the mean eigenvalue, was chosen on English dev: the map
    fitted on train predicts the fine-tuned teacher's dev vectors with MSE 0.29 at ridge 1, 0.34 at 0.1
    and 3, 0.50 at 1e-3 (701 sentences do not determine a 384 x 384 map; predicting the mean gives 1.0).
  - Fine-tuning freezes the word-embedding matrix (--train_embeddings trains it): the 250k-row matrix
    of e5 dominates a CPU optimizer step, and rows of languages absent from the English training data
    should not drift away from the rest of the model.
  - multilingual-e5 gets "query: " before every input (--prefix auto: for intfloat/*e5* names), the
    format it was trained with; the prefix is saved in the checkpoint's config.json ("xlt_prefix").
  - Several seeds rerun the whole experiment (the teacher too), since the teacher's variance is part of
    what the student inherits.

Data parallelism: `torchrun --nproc_per_node N distill.py ...` runs every step on N processes with
DistributedDataParallel (NCCL on GPUs, gloo on CPU). All ranks draw the same global batches of
--batch_size sentences; rank r trains on the r-th of N equal slices of each; the loss of a rank is its
sum over the slice divided by the *global* batch size, times N, so DDP's gradient average is exactly the
gradient of the global-batch mean (identical to one process, up to float rounding). Every rank runs the
same number of steps. Evaluation (and the teacher's soft targets) is sharded too: rank r predicts every
N-th length-sorted batch and model.all_reduce_sum joins the predictions, so all ranks see the same dev
accuracy and select the same epoch; only rank 0 prints and writes files.

Tasks (--task) and where their files are (--data_dir, default $XLT_DATA, else ~/.cache/xlt/data):
  sib200   sib200/<lang>/{train,dev,test}.tsv (python data.py download). Train eng_Latn, dev eng_Latn.
           --langs: FLORES codes, default evaluate.DEFAULT_SIB200_LANGS (14 languages), 'all' = 205.
  nusax    nusax/sentiment/<lang>/{train,valid,test}.csv. Train english, dev english, zero-shot on the
           other NusaX languages (default all 12), scored with macro-F1 as the NusaX paper does.
  xnli     xnli/train-en.tsv, xnli/dev-en.tsv and xnli/test-<lang>.tsv (one file per test language, e.g.
           test-de.tsv), with a header naming premise/sentence1, hypo/hypothesis/sentence2 and
           label/gold_label columns (data.read_pair_tsv); labels entailment/neutral/contradiction or 0-2.
           For instance MultiNLI's English train as train-en.tsv and XNLI 1.0's test split per language.
  pawsx    pawsx/train-en.tsv, pawsx/dev-en.tsv, pawsx/test-<lang>.tsv (PAWS-X's x-final/<lang>/
           {train,dev_2k,test_2k}.tsv renamed; columns id, sentence1, sentence2, label 0/1).
  xnli/pawsx: --langs defaults to every test-<lang>.tsv found.

Outputs (OUT_DIR = --out_dir, default out/distill):
  OUT_DIR/results.json  {"results": {method: {lang: percent}}, "zero_shot_avg": {method: percent},
                        "config": {all arguments}, "seconds": wall time}. With several seeds, "results"
                        and "zero_shot_avg" are means over seeds and two keys are added: "per_seed"
                        {seed: {"results", "zero_shot_avg"}} and "zero_shot_std" {method: sample std}.
  OUT_DIR/train_log.json  per seed and method: English dev curve, chosen epoch, logged training losses.
  OUT_DIR/<method>/     teacher, baseline, output_distill, repr_distill: the English-dev-best model
                        (over epochs, and over seeds) in Hugging Face layout with tokenizer and
                        classification head; model.load_with_head(dir) loads it. (Approach 2's map W is
                        a training device only and is not saved.)

Run:
  XLT_DATA=../shared/data python distill.py                # the default experiment: 17 min on ONE core of a 2-core CPU
  python distill.py --seeds 1 2 3                          # three seeds: mean, std, per seed
  python distill.py --langs all                            # zero-shot on all 205 SIB-200 languages
  torchrun --nproc_per_node 4 distill.py --device cuda     # data parallel on 4 GPUs
  python distill.py --teacher roberta-base --student bert-base-multilingual-cased --task xnli \\
      --data_dir DIR --max_len 128 --batch_size 32 --lr 2e-5 --epochs 2 --compile   # with internet, on a GPU
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate
import model
from model import XltError

METHODS = ("teacher", "baseline", "output_distill", "repr_distill")


# ----------------------------------------------------------------------------------------------------
# 1. The losses
# ----------------------------------------------------------------------------------------------------

def kd_loss(student_logits, teacher_logits, labels, alpha, temperature):
    """Approach 1, per example: (1 - a) CE(y, p_s) + a T^2 KL(p_t^T || p_s^T), p^T = softmax(z / T)."""
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def representation_loss(mapped_student, teacher):
    """Approach 2's distance, per example: ||W h_s + c - h~_t||^2 / d_t (mapped_student = W h_s + c)."""
    return (mapped_student - teacher).pow(2).mean(-1)


def standardise(t):
    """Approach 2's target h~_t: centred and divided by the root-mean-square deviation (one scalar over
    all dimensions), so ||.||^2 / d_t is a fraction of the teacher's variance and the geometry, in which a
    few class directions carry most of the variance, is kept (per-dimension scaling would inflate noise)."""
    t = t - t.mean(0)
    return t / t.pow(2).mean().sqrt().clamp(min=1e-12)


def fit_linear_map(x, y, ridge=1.0):
    """nn.Linear(d_x, d_y) with the ridge least-squares fit of y on x (rows are examples), computed in
    float64: W = argmin ||X_c W^T - Y_c||^2 + lam ||W||^2 on centred data, c = mean(y) - W mean(x), lam =
    ridge * mean eigenvalue of X_c^T X_c (scale-free). Approach 2's starting map."""
    x, y = x.double().cpu(), y.double().cpu()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc).T   # (d_y, d_x)
    lin = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        lin.weight.copy_(w.float())
        lin.bias.copy_((my - w @ mx).float())
    return lin


# ----------------------------------------------------------------------------------------------------
# 2. The classifier: encoder + head (+ approach 2's map), one module so that DDP wraps all of it
# ----------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """forward -> (logits, z): z is the pooled sentence vector h, or W h + c when a map is attached."""

    def __init__(self, encoder, head, proj=None):
        super().__init__()
        self.encoder, self.head, self.proj = encoder, head, proj

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        z = model.pool(h, attention_mask, self.head.pooling)            # pooled once: the head and the map share it
        return self.head.classify(z), (z if self.proj is None else self.proj(z))


def set_dropout(module, p):
    """Every dropout of the encoder (hidden, attention) and the head to p; the config records it."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(m, model.Block):
            m.attn_dropout = p
        if isinstance(m, model.Encoder):
            m.config.hidden_dropout_prob = m.config.attention_probs_dropout_prob = p


def new_classifier(base, num_labels, args, seed):
    """A fresh copy of a pretrained encoder + a new head (initialised from `seed`), word embeddings frozen
    unless --train_embeddings."""
    encoder = copy.deepcopy(base)
    encoder.requires_grad_(True)
    encoder.embed.word.weight.requires_grad_(args.train_embeddings)
    model.set_seed(seed)
    clf = Classifier(encoder, model.ClassificationHead(encoder.config.hidden_size, num_labels, args.pooling))
    if args.dropout is not None:
        set_dropout(clf, args.dropout)
    return clf


# ----------------------------------------------------------------------------------------------------
# 3. Data: the task's sets, tokenized by each model's own tokenizer
# ----------------------------------------------------------------------------------------------------

def _limit(rows, n):
    """n rows spread evenly through the file (SIB-200's test files are sorted by label), or all of them."""
    return rows if n is None or n >= len(rows) else [rows[i * len(rows) // n] for i in range(n)]


def load_task(args):
    """{'train', 'dev': rows, 'test': {lang: rows}, 'num_labels', 'train_lang', 'metric'}; a row is
    {'text', 'label'} or {'text_a', 'text_b', 'label'}."""
    d = data.resolve_data_dir(args.data_dir)
    if args.task == "sib200":
        langs = evaluate.resolve_langs(args.langs, "sib200", d)
        task = {"train": data.read_sib200(d, "eng_Latn", "train"), "dev": data.read_sib200(d, "eng_Latn", "dev"),
                "test": {lang: data.read_sib200(d, lang, "test") for lang in langs},
                "num_labels": len(data.SIB200_LABELS), "train_lang": "eng_Latn", "metric": "accuracy"}
    elif args.task == "nusax":
        langs = evaluate.resolve_langs(args.langs, "nusax", d)
        task = {"train": data.read_nusax(d, "english", "train"), "dev": data.read_nusax(d, "english", "dev"),
                "test": {lang: data.read_nusax(d, lang, "test") for lang in langs},
                "num_labels": len(data.NUSAX_LABELS), "train_lang": "english", "metric": "macro_f1"}
    else:                                   # xnli, pawsx: sentence-pair TSVs the user provides
        root = d / args.task
        if not root.is_dir():
            raise data.DataError(f"{root} does not exist: --task {args.task} reads {args.task}/train-en.tsv, "
                                 f"dev-en.tsv and test-<lang>.tsv from --data_dir (see distill.py's docstring)")
        have = sorted(p.name[len("test-"):-len(".tsv")] for p in root.glob("test-*.tsv"))
        if args.langs in (None, "all"):
            langs = have
        else:
            langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
        if not langs:
            raise data.DataError(f"{root} has no test-<lang>.tsv file")
        task = {"train": data.read_pair_tsv(root / "train-en.tsv"), "dev": data.read_pair_tsv(root / "dev-en.tsv"),
                "test": {lang: data.read_pair_tsv(root / f"test-{lang}.tsv") for lang in langs},
                "num_labels": {"xnli": 3, "pawsx": 2}[args.task], "train_lang": "en", "metric": "accuracy"}
        for name, rows in [("train-en", task["train"]), ("dev-en", task["dev"])] + \
                [(f"test-{lang}", rows) for lang, rows in task["test"].items()]:
            bad = [r["label"] for r in rows if not 0 <= r["label"] < task["num_labels"]]
            if bad:
                raise data.DataError(f"{root / (name + '.tsv')}: label {bad[0]} is out of range for "
                                     f"{args.task} ({task['num_labels']} classes)")
    task["train"] = _limit(task["train"], args.train_limit)
    task["dev"] = _limit(task["dev"], args.eval_limit)
    task["test"] = {lang: _limit(rows, args.eval_limit) for lang, rows in task["test"].items()}
    for name, rows in [("training set", task["train"]), ("dev set", task["dev"])] + list(task["test"].items()):
        if not rows:
            raise data.DataError(f"{args.task}: the {name} is empty")
    return task


def encode_rows(tok, rows, max_len, prefix):
    """data.encode_rows (single texts or pairs, each example keeping its label), plus each example's row."""
    examples = data.encode_rows(tok, rows, max_len, prefix)
    for i, ex in enumerate(examples):
        ex["index"] = i                                # the row of the teacher's targets
    return examples


def encode_task(tok, task, max_len, prefix):
    return {"train": encode_rows(tok, task["train"], max_len, prefix),
            "dev": encode_rows(tok, task["dev"], max_len, prefix),
            "test": {lang: encode_rows(tok, rows, max_len, prefix) for lang, rows in task["test"].items()},
            "pad": data.special_ids(tok)["pad"]}


# ----------------------------------------------------------------------------------------------------
# 4. Prediction and scores, sharded over the ranks of a data-parallel run
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(clf, examples, pad_id, device, rank=0, world=1, batch_size=64):
    """(logits (N, C), z (N, d)) of every example in eval mode (no dropout), float32 on `device`. Batches
    are length-sorted (evaluate's); rank r runs batches r, r + world, ...; all_reduce_sum joins the pieces
    (every row is non-zero on exactly one rank, so the sum is exact)."""
    was_training = clf.training
    clf.eval()
    batches = evaluate.length_batches(examples, batch_size)
    width = clf.encoder.config.hidden_size if clf.proj is None else clf.proj.out_features
    logits = torch.zeros(len(examples), clf.head.num_labels, device=device)
    z = torch.zeros(len(examples), width, device=device)
    for idx in batches[rank::world]:
        batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad_id), device)
        with model.autocast(device):
            out_logits, out_z = clf(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits[batch["index"]], z[batch["index"]] = out_logits.float(), out_z.float()
    model.all_reduce_sum(logits)
    model.all_reduce_sum(z)
    clf.train(was_training)
    return logits, z


def score(clf, examples, pad_id, metric, num_labels, device, rank, world, batch_size):
    """Accuracy or macro-F1 (percent) of the classifier on encoded examples (evaluate's metrics)."""
    preds = predict(clf, examples, pad_id, device, rank, world, batch_size)[0].argmax(-1).tolist()
    labels = [ex["label"] for ex in examples]
    return evaluate.macro_f1(preds, labels, num_labels) if metric == "macro_f1" else evaluate.accuracy(preds, labels)


# ----------------------------------------------------------------------------------------------------
# 5. The training loop, one for all four models
# ----------------------------------------------------------------------------------------------------

def train(clf, enc, method, targets, args, device, rank, world, seed, metric, num_labels):
    """Fine-tune `clf` on enc['train'] with the loss of `method`, keep the epoch best on English dev.
    targets: the teacher's (logits, standardised vectors) of the training set, indexed like enc['train'].
    Returns {'dev_curve', 'best_epoch', 'dev', 'loss'} and leaves the best weights in clf."""
    examples, pad = enc["train"], enc["pad"]
    lengths = [len(ex["input_ids"]) for ex in examples]
    if args.compile:
        for block in clf.encoder.layers:
            block.compile()
    net = clf
    if world > 1:
        net = nn.parallel.DistributedDataParallel(clf, device_ids=[device.index] if device.type == "cuda" else None)
    opt = model.configure_optimizer([clf], args.lr, args.weight_decay)
    params = [p for g in opt.param_groups for p in g["params"]]
    # Every epoch's global batches up front (cheap index lists), so the schedule's length is counted, not
    # guessed; a batch smaller than the world would leave a rank without rows, so it is skipped.
    epoch_batches = [[b for b in data.bucket_batches(lengths, args.batch_size, seed, epoch) if len(b) >= world]
                     for epoch in range(args.epochs)]
    total = sum(map(len, epoch_batches))
    warmup = int(args.warmup * total)
    frozen = {name for name, p in clf.named_parameters() if not p.requires_grad}
    log = {"dev_curve": [], "loss": []}
    best, best_state, step = -1.0, None, 0
    running, n = torch.zeros((), device=device), 0
    t_logits, t_z = targets if targets is not None else (None, None)
    for epoch, global_batches in enumerate(epoch_batches):
        clf.train()
        bar = tqdm(global_batches, desc=f"{method} epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=rank != 0)
        for global_idx in bar:
            idx = np.array_split(np.asarray(global_idx), world)[rank].tolist()   # this rank's slice
            lr = args.lr * model.lr_schedule(step, total, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad), device)
            with model.autocast(device):
                logits, z = net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            logits, y = logits.float(), batch["label"]
            if method == "output_distill":
                per_example = kd_loss(logits, t_logits[batch["index"]], y, args.alpha, args.temperature)
            elif method == "repr_distill":
                per_example = F.cross_entropy(logits, y, reduction="none") + \
                    args.beta * representation_loss(z.float(), t_z[batch["index"]])
            else:                                             # teacher, baseline: plain fine-tuning
                per_example = F.cross_entropy(logits, y, reduction="none")
            # The mean over the *global* batch; x world because DDP averages the ranks' gradients.
            loss = per_example.sum() * (world / len(global_idx))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            running += loss.detach()
            n += 1
            step += 1
            if n == args.log_every or step == total:
                mean_loss = model.all_reduce_sum(running).item() / world / n   # the only host sync
                log["loss"].append([step, round(mean_loss, 5)])
                if rank == 0:
                    bar.write(f"[{method}] step {step}/{total}  loss {mean_loss:.4f}  lr {lr:.2e}")
                running.zero_()
                n = 0
        dev = score(clf, enc["dev"], pad, metric, num_labels, device, rank, world, args.eval_batch_size)
        log["dev_curve"].append(round(dev, 2))
        if rank == 0:
            tqdm.write(f"[{method}] epoch {epoch + 1}: English dev {metric} {dev:.1f}")
        if dev > best:       # every rank sees the same reduced dev score, so every rank keeps the same epoch
            best, log["best_epoch"] = dev, epoch + 1
            best_state = {k: v.detach().clone() for k, v in clf.state_dict().items() if k not in frozen}
    clf.load_state_dict(best_state, strict=False)    # strict=False: frozen weights were never copied
    log["dev"] = round(best, 2)
    return log


# ----------------------------------------------------------------------------------------------------
# 6. The experiment: teacher, baseline, approach 1, approach 2, each scored zero-shot
# ----------------------------------------------------------------------------------------------------

def run_seed(seed, task, bases, encs, toks, prefixes, args, device, rank, world, best_dev):
    """The four models of one seed. Returns (results {method: {lang: percent}}, logs {method: log})."""
    metric, C = task["metric"], task["num_labels"]
    common = dict(args=args, device=device, rank=rank, world=world, seed=seed, metric=metric, num_labels=C)
    results, logs = {}, {}

    def finish(method, clf, role, log):
        t = time.time()
        results[method] = {lang: score(clf, ex, encs[role]["pad"], metric, C, device, rank, world,
                                       args.eval_batch_size)
                           for lang, ex in tqdm(encs[role]["test"].items(), desc=f"{method} zero-shot",
                                                leave=False, disable=rank != 0)}
        log["eval_seconds"] = round(time.time() - t, 1)
        logs[method] = log
        zs = zero_shot_avg(results[method], task["train_lang"])
        if rank == 0:
            tqdm.write(f"[distill] seed {seed} {method}: English dev {log['dev']:.1f} (epoch {log['best_epoch']}), "
                       f"zero-shot avg {'-' if zs is None else f'{zs:.1f}'}, {log['seconds']:.0f} s train + "
                       f"{log['eval_seconds']:.0f} s eval")
        if rank == 0 and log["dev"] > best_dev.get(method, -1.0):     # best over seeds, by English dev only
            best_dev[method] = log["dev"]
            model.save_pretrained(clf.encoder, Path(args.out_dir) / method, tokenizer=toks[role], head=clf.head,
                                  extra={"xlt_prefix": prefixes[role],
                                         "xlt_distill": {"method": method, "seed": seed, "task": args.task,
                                                         "english_dev": log["dev"], "epoch": log["best_epoch"]}})

    def timed_train(clf, role, method, targets):
        clf.to(device)
        t = time.time()
        log = train(clf, encs[role], method, targets, **common)
        log["seconds"] = round(time.time() - t, 1)
        return log

    # 1. the monolingual teacher, fine-tuned on English, then frozen: its soft targets, computed once.
    teacher = new_classifier(bases["teacher"], C, args, seed)
    log = timed_train(teacher, "teacher", "teacher", None)
    finish("teacher", teacher, "teacher", log)
    t_logits, t_z = predict(teacher, encs["teacher"]["train"], encs["teacher"]["pad"], device, rank, world,
                            args.eval_batch_size)
    t_z = standardise(t_z)
    del teacher

    # 2. baseline: vanilla fine-tuning of the multilingual student.
    student = new_classifier(bases["student"], C, args, seed)
    finish("baseline", student, "student", timed_train(student, "student", "baseline", None))

    # 3. approach 1: output distillation.
    student = new_classifier(bases["student"], C, args, seed)
    finish("output_distill", student, "student",
           timed_train(student, "student", "output_distill", (t_logits, t_z)))

    # 4. approach 2: representation distillation through a linear map, started at the least-squares fit
    #    from the pretrained student's vectors to the teacher's.
    student = new_classifier(bases["student"], C, args, seed).to(device)
    s_z = predict(student, encs["student"]["train"], encs["student"]["pad"], device, rank, world,
                  args.eval_batch_size)[1]
    student.proj = fit_linear_map(s_z, t_z, args.ridge).to(device)
    with torch.no_grad():
        start = representation_loss(student.proj(s_z), t_z).mean().item()
    log = timed_train(student, "student", "repr_distill", (t_logits, t_z))
    log["repr_loss_at_start"] = round(start, 4)
    finish("repr_distill", student, "student", log)
    del student
    return results, logs


def zero_shot_avg(scores, train_lang):
    values = [v for lang, v in scores.items() if lang != train_lang]
    return sum(values) / len(values) if values else None


def summarize(per_seed, train_lang):
    """results.json's numbers: per-language means over seeds, zero-shot averages (mean and, with several
    seeds, sample std over the seeds' own zero-shot averages). Rounded to 0.01 after averaging."""
    seeds = list(per_seed)
    methods = list(per_seed[seeds[0]])
    langs = list(per_seed[seeds[0]][methods[0]])
    mean = {m: {lang: statistics.fmean(per_seed[s][m][lang] for s in seeds) for lang in langs} for m in methods}
    zs = {m: [zero_shot_avg(per_seed[s][m], train_lang) for s in seeds] for m in methods}
    out = {"results": {m: {lang: round(v, 2) for lang, v in row.items()} for m, row in mean.items()},
           "zero_shot_avg": {m: None if None in v else round(statistics.fmean(v), 2) for m, v in zs.items()}}
    if len(seeds) > 1:
        out["per_seed"] = {str(s): {"results": {m: {lang: round(v, 2) for lang, v in row.items()}
                                                for m, row in per_seed[s].items()},
                                    "zero_shot_avg": {m: None if zs[m][i] is None else round(zs[m][i], 2)
                                                      for m in methods}}
                           for i, s in enumerate(seeds)}
        out["zero_shot_std"] = {m: None if None in v else round(statistics.stdev(v), 2) for m, v in zs.items()}
    return out, mean


# ----------------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " (the module docstring says more)",
                                formatter_class=model.HelpFormatter)
    p.add_argument("--teacher", default="sentence-transformers/all-MiniLM-L6-v2",
                   help="the monolingual (English) teacher: hub name or directory")
    p.add_argument("--student", default="intfloat/multilingual-e5-small",
                   help="the multilingual student: hub name or directory")
    p.add_argument("--task", default="sib200", choices=("sib200", "xnli", "pawsx", "nusax"),
                   help="benchmark; xnli/pawsx read TSVs you provide (see the docstring)")
    p.add_argument("--langs", default=None, help="comma-separated test languages, or 'all'. None: sib200 "
                   "evaluate.DEFAULT_SIB200_LANGS, nusax all 12, xnli/pawsx every test-<lang>.tsv")
    p.add_argument("--data_dir", default=None, help="data folder; None: $XLT_DATA, else ~/.cache/xlt/data")
    p.add_argument("--out_dir", default="out/distill", help="results.json, train_log.json, checkpoints")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one full experiment per seed")
    p.add_argument("--compile", action="store_true", help="torch.compile the Transformer blocks")
    p.add_argument("--epochs", type=int, default=4, help="training epochs, every model")
    p.add_argument("--batch_size", type=int, default=32, help="global batch (split over the ranks under torchrun)")
    p.add_argument("--eval_batch_size", type=int, default=64, help="sentences per prediction batch")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, every model")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's, on matrices only")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warmup")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--max_len", type=int, default=128, help="subword tokens per input")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"), help="sentence vector of both models")
    p.add_argument("--dropout", type=float, default=None, help="set every dropout probability. None: the "
                   "checkpoint's own (0.1 for the defaults); 0 makes runs deterministic")
    p.add_argument("--train_embeddings", action="store_true", help="also train the word-embedding matrix")
    p.add_argument("--prefix", default="auto", help="text before every input: 'auto' = 'query: ' for "
                   "intfloat/*e5* models, nothing for others; any other value is used for both models")
    p.add_argument("--alpha", type=float, default=0.5, help="approach 1: weight a of the distillation term")
    p.add_argument("--temperature", type=float, default=2.0, help="approach 1: temperature T")
    p.add_argument("--beta", type=float, default=0.1, help="approach 2: weight b of the representation loss")
    p.add_argument("--ridge", type=float, default=1.0, help="approach 2: ridge of the map's least-squares start")
    p.add_argument("--train_limit", type=int, default=None,
                   help="use N training rows, evenly spaced in the file (quick tests)")
    p.add_argument("--eval_limit", type=int, default=None, help="use N rows of dev and of each test set, evenly spaced")
    p.add_argument("--log_every", type=int, default=10, help="steps between logged losses")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size", "eval_batch_size", "max_len", "log_every"):
        if getattr(args, flag) < 1:
            raise XltError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("train_limit", "eval_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise XltError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.alpha <= 1:
        raise XltError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.temperature <= 0:
        raise XltError(f"--temperature must be > 0, got {args.temperature}")
    for flag in ("lr", "beta", "ridge", "weight_decay", "clip"):
        if getattr(args, flag) < 0:
            raise XltError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0 <= args.warmup < 1:
        raise XltError(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise XltError(f"--dropout must be in [0, 1), got {args.dropout}")
    if len(set(args.seeds)) != len(args.seeds):
        raise XltError(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = model.init_distributed(args.device)
    try:
        return run(args, rank, world, device)
    finally:
        model.close_distributed()


def run(args, rank, world, device):
    t0 = time.time()
    if args.batch_size < world:
        raise XltError(f"--batch_size {args.batch_size} is smaller than the {world} processes")
    task = load_task(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    names = {"teacher": args.teacher, "student": args.student}
    prefixes = {role: evaluate.resolve_prefix(args.prefix, name) for role, name in names.items()}
    toks = {role: data.load_tokenizer(name) for role, name in names.items()}
    bases = {role: model.Encoder.from_pretrained(name, verbose=rank == 0) for role, name in names.items()}
    encs = {role: encode_task(toks[role], task, args.max_len, prefixes[role]) for role in names}
    n_test = sum(len(rows) for rows in task["test"].values())
    say(f"[distill] {args.task}: train {len(task['train'])}, dev {len(task['dev'])}, test {len(task['test'])} "
        f"languages / {n_test} rows; {world} process(es) on {device}")
    for role, name in names.items():
        c = bases[role].config
        say(f"[distill] {role}: {name} ({c.num_hidden_layers} layers, width {c.hidden_size}, "
            f"vocabulary {c.vocab_size}, prefix {prefixes[role]!r})")

    per_seed, logs, best_dev = {}, {}, {}
    for seed in args.seeds:
        per_seed[seed], logs[str(seed)] = run_seed(seed, task, bases, encs, toks, prefixes, args, device,
                                                   rank, world, best_dev)
    summary, mean = summarize(per_seed, task["train_lang"])
    seconds = round(time.time() - t0, 1)
    if rank == 0:
        metric = "macro-F1" if task["metric"] == "macro_f1" else "accuracy"
        seeds = f"mean of seeds {args.seeds}" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
        print(f"\n{args.task} test {metric} (%), trained on {task['train_lang']} only, {seeds}; "
              f"model selection on English dev:\n")
        print(evaluate.markdown_table(mean, train_lang=task["train_lang"]))
        std = summary.get("zero_shot_std", {})
        if std and None not in std.values():                 # None: --langs has no language but the training one
            print("\nzero-shot avg, mean +- std over seeds: " + ", ".join(
                f"{m} {zero_shot_avg(mean[m], task['train_lang']):.1f} +- {std[m]:.1f}"
                for m in METHODS))                   # the mean unrounded, as in the table (no double rounding)
        result = {"results": summary["results"], "zero_shot_avg": summary["zero_shot_avg"],
                  "config": vars(args) | {"world_size": world, "device": str(device)}, "seconds": seconds}
        if "per_seed" in summary:
            result["per_seed"] = summary["per_seed"]
            result["zero_shot_std"] = summary["zero_shot_std"]
        out = Path(args.out_dir)
        evaluate.write_json(out / "results.json", result)
        evaluate.write_json(out / "train_log.json", logs)
        print(f"\n[distill] wrote {out / 'results.json'}, {out / 'train_log.json'} and the checkpoints "
              f"{', '.join(str(out / m) for m in METHODS)}; {seconds:.0f} s")
        return result
    return None


if __name__ == "__main__":
    try:
        main()
    except XltError as e:
        sys.exit(f"error: {e}")
