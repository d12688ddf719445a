"""distill.py: can a monolingual teacher make a multilingual student better in languages it never saw labels for?

Paper: Zewen Chi, Li Dong, Furu Wei, Xian-Ling Mao, Heyan Huang (2020), "Can Monolingual Pretrained Models
Help Cross-Lingual Classification?", AACL-IJCNLP 2020, pages 12-17 (arXiv:1911.03913). Its abstract: due to
the constant model capacity, multilingual pre-training usually lags behind monolingual models; the paper
presents two approaches that transfer knowledge from monolingual pretrained models to multilingual ones,
and they outperform vanilla multilingual fine-tuning on two zero-shot cross-lingual classification
benchmarks. We could not read the full text: the two approaches below are the *standard* output-level and
representation-level knowledge distillation, not a reconstruction of the paper's equations.

The experiment in five lines:
  1. teacher: fine-tune the monolingual (English) model on the English training set, then freeze it.
  2. baseline: fine-tune the multilingual student on the same English data (vanilla fine-tuning).
  3. approach 1, output distillation: the student also matches the teacher's softened class distribution.
  4. approach 2, representation distillation: the student's sentence vector, through a learned linear map,
     is pulled to the teacher's, alongside the task loss.
  5. evaluate all four zero-shot on English + other languages; model selection on English dev only.

The equations (z = logits, y = gold label, p^T = softmax(z / T), h = the pooled last layer):
  baseline / teacher   L = CE(y, p_s)
  approach 1           L = (1 - a) CE(y, p_s) + a T^2 KL(p_t^T || p_s^T)           (Hinton et al. 2015)
  approach 2           L = CE(y, p_s) + b ||W h_s + c - h~_t||^2 / d_t
  T^2 keeps the KL term's gradient, T (p_s^T - p_t^T), at one scale for every T, so `a` means the same at
  any T. h~_t: the teacher's vector, centred and divided by its RMS deviation over the training set (one
  scalar), so the term is a fraction of the teacher's variance. W (d_t x d_s), c: a map trained with the
  student (the widths may differ), started at the ridge least-squares fit from the pretrained student's
  vectors to the teacher's, so the loss at step 0 is what the student itself still has to change.

Ours, not the paper's (its abstract names neither its benchmarks nor its monolingual models): teacher
all-MiniLM-L6-v2 (English only), student multilingual-e5-small (~100 languages), both embedded offline;
SIB-200 topic classification (7 classes, 701 English training sentences), zero-shot on
evaluate.DEFAULT_SIB200_LANGS; a = 0.5, T = 2 (common values, not tuned), b = 0.1 and ridge 1 x the mean
eigenvalue (chosen on English dev, README.md); every model: 4 epochs, batch 32, lr 1e-4, AdamW, 10% warmup,
mean pooling, word embeddings frozen, e5 given "query: ". The teacher is frozen and run without dropout, so
its logits and vectors on the training set are computed once (exact). Each seed reruns all four models.
Distillation can only help where the teacher knows more than the student: after the baseline the run prints
and keeps (train_log, baseline, teacher_minus_student) the teacher's English dev and test score minus the
student's. With the defaults it does not (README: -1.1 on English test, 3 seeds). Our construction, not
the paper's, gives the teacher the lead: `--student_layers N` keeps only e5's bottom N blocks. With 4 the
teacher leads by 16.7 English test points (README, 3 seeds; with 6, MiniLM-L6's depth, not beyond noise);
the saved students say num_hidden_layers N, so they load as N-block models (transformers too).

Tasks (--task; files under --data_dir): sib200 (train/dev eng_Latn); nusax (train/dev english, macro-F1 as
in the NusaX paper); xnli and pawsx: <task>/train-en.tsv, dev-en.tsv and test-<lang>.tsv that you provide,
with a header naming premise/sentence1, hypo/hypothesis/sentence2 and label/gold_label (data.read_pair_tsv).

Data parallel: under `torchrun --nproc_per_node N` rank r trains on the r-th of N slices of each global
batch; its loss is its slice's sum x N / the global batch size, so DDP's gradient average is the gradient
of the global-batch mean. Evaluation is sharded by batch and joined by model.all_reduce_sum; rank 0 writes.
Outputs: OUT_DIR/results.json, results.md and (unless --no_save) OUT_DIR/<method>/, the English-dev-best
model of each method over seeds with its head (model.load_with_head; approach 2's map is not saved).

Run:
  XLT_DATA=../shared/data python distill.py                # the default experiment
  python distill.py --seeds 1 2 3 --langs all              # three seeds, all 205 SIB-200 languages
  python distill.py --student_layers 4 --out_dir out/distill-l4   # a weaker student, a stronger teacher (ours)
  torchrun --nproc_per_node 4 distill.py --device cuda     # data parallel on 4 GPUs
  python distill.py --teacher roberta-base --student bert-base-multilingual-cased --task xnli --data_dir DIR
"""
import copy
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
PAPER = ("Chi, Dong, Wei, Mao, Huang (2020): Can Monolingual Pretrained Models Help Cross-Lingual "
         "Classification? AACL-IJCNLP 2020, arXiv:1911.03913")


# -------------------- 1. The losses -----------------------------------------------------------------

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


# -------------------- 2. The classifier: encoder + head (+ approach 2's map), one module for DDP ------

class Classifier(nn.Module):
    """forward -> (logits, z): z is the pooled sentence vector h, or W h + c when a map is attached."""

    def __init__(self, encoder, head, proj=None):
        super().__init__()
        self.encoder, self.head, self.proj = encoder, head, proj

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        z = model.pool(h, attention_mask, self.head.pooling)            # pooled once: the head and the map share it
        return self.head.classify(z), (z if self.proj is None else self.proj(z))


def new_classifier(base, num_labels, args, seed):
    """A fresh copy of a pretrained encoder + a new head (initialised from `seed`), word embeddings frozen
    unless --train_embeddings."""
    encoder = copy.deepcopy(base)
    encoder.requires_grad_(True)
    encoder.embed.word.weight.requires_grad_(args.train_embeddings)
    model.set_seed(seed)
    return Classifier(encoder, model.ClassificationHead(encoder.config.hidden_size, num_labels, args.pooling,
                                                        encoder.config.hidden_dropout_prob))


def predict(clf, examples, pad_id, device, rank=0, world=1, batch_size=64):
    """(logits (N, C), z (N, d)) of every example in eval mode, float32 on `device`. Batches are
    length-sorted; rank r runs batches r, r + world, ...; all_reduce_sum joins the pieces (every row is
    non-zero on exactly one rank, so the sum is exact)."""
    width = clf.encoder.config.hidden_size if clf.proj is None else clf.proj.out_features
    logits = torch.zeros(len(examples), clf.head.num_labels, device=device)
    z = torch.zeros(len(examples), width, device=device)
    with model.evaluating(clf):
        for idx in evaluate.length_batches(examples, batch_size)[rank::world]:
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad_id), device)
            with model.autocast(device):
                out_logits, out_z = clf(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            logits[batch["index"]], z[batch["index"]] = out_logits.float(), out_z.float()
    return model.finite(model.all_reduce_sum(logits), "the classifier's outputs"), model.all_reduce_sum(z)


def score(clf, examples, pad_id, metric, device, rank=0, world=1, outcomes=False):
    """Accuracy or macro-F1 (percent) of the classifier on encoded examples (evaluate's metrics); outcomes:
    (percent, per-example outcomes, evaluate.hits)."""
    preds = predict(clf, examples, pad_id, device, rank, world)[0].argmax(-1).tolist()
    labels = [ex["label"] for ex in examples]
    if metric == "macro_f1":
        percent = evaluate.macro_f1(preds, labels, clf.head.num_labels)
    else:
        percent = evaluate.accuracy(preds, labels)
    return (percent, evaluate.hits(preds, labels)) if outcomes else percent


# -------------------- 3. The training loop, one for all four models -----------------------------------

def train(clf, enc, method, targets, args, device, rank, world, seed, metric):
    """Fine-tune `clf` on enc['train'] with the loss of `method`, keep the epoch best on English dev.
    targets: the teacher's (logits, standardised vectors) of the training set, indexed like enc['train'].
    Returns {'dev_curve', 'loss', 'dev', 'best_epoch'} and leaves the best weights in clf."""
    examples, pad = enc["train"], enc["pad"]
    if args.compile:
        model.compile_blocks(clf)
    net = clf if world == 1 else nn.parallel.DistributedDataParallel(
        clf, device_ids=[device.index] if device.type == "cuda" else None)
    opt = model.configure_optimizer([clf], args.lr, args.weight_decay)
    # Every epoch's global batches up front, so the schedule's length is counted, not guessed; a batch
    # smaller than the world would leave a rank without rows, so it is skipped.
    lengths = [len(ex["input_ids"]) for ex in examples]
    epoch_batches = [[b for b in data.bucket_batches(lengths, args.batch_size, seed, epoch) if len(b) >= world]
                     for epoch in range(args.epochs)]
    total = sum(map(len, epoch_batches))
    losses, log, best, step = model.LossLog(args.log_every, total, method, opt), {"dev_curve": [], "loss": []}, None, 0
    for epoch, batches in enumerate(epoch_batches):
        clf.train()
        for global_idx in tqdm(batches, desc=f"{method} epoch {epoch + 1}/{args.epochs}", leave=False,
                               disable=rank != 0):
            idx = np.array_split(np.asarray(global_idx), world)[rank].tolist()   # this rank's slice
            lr = model.set_lr(opt, model.lr_schedule(step, total, int(args.warmup * total)))
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], pad), device)
            with model.autocast(device):
                logits, z = net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            logits, y, rows = logits.float(), batch["label"], batch["index"]
            if method == "output_distill":                    # approach 1
                per_example = kd_loss(logits, targets[0][rows], y, args.alpha, args.temperature)
            else:                                  # teacher, baseline: plain fine-tuning; approach 2 adds to it
                per_example = F.cross_entropy(logits, y, reduction="none")
                if method == "repr_distill":                  # approach 2
                    per_example = per_example + args.beta * representation_loss(z.float(), targets[1][rows])
            # The mean over the *global* batch; x world because DDP averages the ranks' gradients.
            loss = per_example.sum() * (world / len(global_idx))
            loss.backward()
            model.optimizer_step(opt)
            step += 1
            if (mean := losses.add(loss)) is not None:        # the ranks' mean: the global batches' loss
                mean = model.all_reduce_sum(torch.tensor(mean[0], device=device)).item() / world
                log["loss"].append([step, round(mean, 5)])
                if rank == 0:
                    tqdm.write(f"[{method}] step {step}/{total}  loss {mean:.4f}  lr {lr:.2e}")
        losses.check()                                     # divergence: reported with its step, before scoring
        dev = score(clf, enc["dev"], pad, metric, device, rank, world)
        log["dev_curve"].append(round(dev, 2))
        if rank == 0:
            tqdm.write(f"[{method}] epoch {epoch + 1}: English dev {metric} {dev:.1f}")
        if best is None or dev > best[0]:   # every rank sees the same reduced dev score: all keep one epoch
            best = (dev, epoch + 1, model.trainable_state(clf))
    losses.finish()
    model.restore(best[2])
    log.update(dev=round(best[0], 2), best_epoch=best[1])
    return log


# -------------------- 4. The experiment: teacher, baseline, approach 1, approach 2 ---------------------

def load_task(args):
    """{'train', 'dev': rows, 'test': {lang: rows}, 'num_labels', 'train_lang', 'metric'}; a row is
    {'text', 'label'} or {'text_a', 'text_b', 'label'}."""
    d = data.resolve_data_dir(args.data_dir)
    if args.task in ("sib200", "nusax"):
        sib = args.task == "sib200"
        read, lang0 = (data.read_sib200, "eng_Latn") if sib else (data.read_nusax, "english")
        task = {"train": read(d, lang0, "train"), "dev": read(d, lang0, "dev"),
                "test": {lang: read(d, lang, "test") for lang in evaluate.resolve_langs(args.langs, args.task, d)},
                "num_labels": len(data.SIB200_LABELS if sib else data.NUSAX_LABELS), "train_lang": lang0,
                "metric": "accuracy" if sib else "macro_f1"}
    else:                                   # xnli, pawsx: sentence-pair TSVs the user provides
        root = d / args.task
        if not root.is_dir():
            raise data.DataError(f"{root} does not exist: --task {args.task} reads {args.task}/train-en.tsv, "
                                 f"dev-en.tsv and test-<lang>.tsv from --data_dir (see distill.py's docstring)")
        have = sorted(p.name[len("test-"):-len(".tsv")] for p in root.glob("test-*.tsv"))
        langs = have if args.langs in (None, "all") else [x.strip() for x in args.langs.split(",") if x.strip()]
        bad = [lang for lang in langs if lang not in have]
        if not langs or bad:
            raise data.DataError(f"--langs: {root} has no test-{bad[0] if bad else '<lang>'}.tsv file "
                                 f"(it has: {', '.join(have) or 'none'})")
        task = {"train": data.read_pair_tsv(root / "train-en.tsv"), "dev": data.read_pair_tsv(root / "dev-en.tsv"),
                "test": {lang: data.read_pair_tsv(root / f"test-{lang}.tsv") for lang in langs},
                "num_labels": {"xnli": 3, "pawsx": 2}[args.task], "train_lang": "en", "metric": "accuracy"}
        for name, rows in [("train-en", task["train"]), ("dev-en", task["dev"])] + \
                [(f"test-{lang}", rows) for lang, rows in task["test"].items()]:
            bad = [r["label"] for r in rows if not 0 <= r["label"] < task["num_labels"]]
            if bad:
                raise data.DataError(f"{root / (name + '.tsv')}: label {bad[0]} is out of range for "
                                     f"{args.task} ({task['num_labels']} classes)")
    task["train"], task["dev"] = data.subset(task["train"], args.limit), data.subset(task["dev"], args.eval_limit)
    task["test"] = {lang: data.subset(rows, args.eval_limit) for lang, rows in task["test"].items()}
    for name, rows in [("training set", task["train"]), ("dev set", task["dev"])] + list(task["test"].items()):
        if not rows:
            raise data.DataError(f"{args.task}: the {name} is empty")
    return task


def encode_rows(tok, rows, max_len, prefix):
    """data.encode_rows (single texts or pairs, each example keeping its label), plus each example's row,
    where predict puts its output and where the teacher's targets of a training example are."""
    examples = data.encode_rows(tok, rows, max_len, prefix)
    for i, ex in enumerate(examples):
        ex["index"] = i
    return examples


def teacher_advantage(teacher, student, lang):
    """Teacher minus student in the training language, from their records: English dev (always) and test
    (when --langs has it). Distillation can only pass on what the teacher has more of."""
    test = [r["scores"].get(lang) for r in (teacher, student)]
    return {"dev": round(teacher["log"]["dev"] - student["log"]["dev"], 2),
            "test": None if None in test else round(test[0] - test[1], 2)}


def run_seed(seed, task, bases, encs, toks, prefixes, args, device, rank, world, run, best_dev, publish):
    """The four models of one seed, each a unit of the run folder ("seed1-teacher", ...; a finished one is
    skipped): publish(seed, method, record) gets each record, {'scores': {lang: percent}, 'log', 'outcomes':
    {lang: per-example outcomes}}."""
    C, metric = task["num_labels"], task["metric"]

    def fit(method, role, targets=None, clf=None):
        """Train (a fresh model unless clf is given), score it zero-shot, save it if best on dev so far."""
        clf = (new_classifier(bases[role], C, args, seed) if clf is None else clf).to(device)
        t = time.time()
        log = train(clf, encs[role], method, targets, args, device, rank, world, seed, metric)
        log["seconds"], t = round(time.time() - t, 1), time.time()
        tested = {lang: score(clf, ex, encs[role]["pad"], metric, device, rank, world, outcomes=True)
                  for lang, ex in tqdm(encs[role]["test"].items(), desc=f"{method} zero-shot",
                                       leave=False, disable=rank != 0)}
        scores = {lang: s for lang, (s, _) in tested.items()}
        log["eval_seconds"] = round(time.time() - t, 1)
        if rank == 0:
            zs = evaluate.with_averages(scores, task["train_lang"])["zero-shot avg"]
            tqdm.write(f"[distill] seed {seed} {method}: English dev {log['dev']:.1f} (epoch {log['best_epoch']}), "
                       f"zero-shot avg {'-' if zs is None else f'{zs:.1f}'}, {log['seconds']:.0f} s train + "
                       f"{log['eval_seconds']:.0f} s eval")
        if rank == 0 and not args.no_save and log["dev"] > best_dev.get(method, -1.0):   # by English dev only
            model.save_pretrained(clf.encoder, Path(args.out_dir) / method, tokenizer=toks[role], head=clf.head,
                                  extra={"xlt_prefix": prefixes[role],
                                         "xlt_distill": {"method": method, "seed": seed, "task": args.task,
                                                         "english_dev": log["dev"], "epoch": log["best_epoch"]}})
        return clf, {"scores": scores, "log": log, "outcomes": {lang: o for lang, (_, o) in tested.items()}}

    def finished(method, record):
        best_dev[method] = max(best_dev.get(method, -1.0), record["log"]["dev"])   # what the saved model has
        publish(seed, method, record)
        return record

    # 1. the monolingual teacher, fine-tuned on English, then frozen: its soft targets, computed once and kept
    #    with its unit, so that a resumed run has them.
    if (record := run.done(f"seed{seed}-teacher")) is None:
        teacher, record = fit("teacher", "teacher")
        t_logits, t_z = predict(teacher, encs["teacher"]["train"], encs["teacher"]["pad"], device, rank, world)
        record = run.finish(f"seed{seed}-teacher", record, {"logits": t_logits, "z": standardise(t_z)})
        del teacher
    tensors = record.pop("tensors")
    targets = (tensors["logits"].to(device), tensors["z"].to(device))
    teacher_record = finished("teacher", record)
    for method in METHODS[1:]:
        if (record := run.done(f"seed{seed}-{method}")) is None:
            if method == "repr_distill":
                # approach 2: representation distillation through a linear map, started at the ridge fit from
                # the pretrained student's vectors to the teacher's.
                student = new_classifier(bases["student"], C, args, seed).to(device)
                s_z = predict(student, encs["student"]["train"], encs["student"]["pad"], device, rank, world)[1]
                student.proj = fit_linear_map(s_z, targets[1], args.ridge).to(device)
                with torch.no_grad():
                    start = representation_loss(student.proj(s_z), targets[1]).mean().item()
                record = fit(method, "student", targets, student)[1]
                record["log"]["repr_loss_at_start"] = round(start, 4)
            else:                   # baseline: vanilla fine-tuning; output_distill: approach 1
                record = fit(method, "student", targets if method == "output_distill" else None)[1]
            if method == "baseline":        # the premise: is the teacher stronger in its language than the student?
                gap = teacher_advantage(teacher_record, record, task["train_lang"])
                record["log"]["teacher_minus_student"] = gap
                if rank == 0:
                    test = "-" if gap["test"] is None else f"{gap['test']:+.1f}"
                    tqdm.write(f"[distill] seed {seed}: teacher minus student (baseline) in {task['train_lang']}: "
                               f"dev {gap['dev']:+.1f}, test {test} (the teacher is "
                               f"{'' if gap['dev'] > 0 else 'NOT '}stronger on dev)")
            record = run.finish(f"seed{seed}-{method}", record)
        finished(method, record)


def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    rank, world, device = model.init_distributed(args.device)
    try:
        if args.batch_size < world:
            raise XltError(f"--batch_size {args.batch_size} is smaller than the {world} processes")
        task = load_task(args)
        run = evaluate.RunFolder(args, "distill.py", rank=rank)           # checked and locked before the models load
        model.all_reduce_sum(torch.zeros(1, device=device))               # the other ranks wait for rank 0's checks
        names = {"teacher": args.teacher, "student": args.student}
        prefixes = {role: evaluate.resolve_prefix(args.prefix, name) for role, name in names.items()}
        toks = {role: data.load_tokenizer(name) for role, name in names.items()}
        bases = {role: model.Encoder.from_pretrained(name, dropout=args.dropout, verbose=rank == 0).to(device)
                 for role, name in names.items()}      # on the device: every model is copied from these there
        if args.student_layers:                     # our weaker-student setting: the student's bottom blocks
            model.keep_layers(bases["student"], args.student_layers)
        for role, name in names.items():
            evaluate.check_max_len(args.max_len, bases[role], name)
        if not args.no_save:
            run.need(bases["teacher"], *[bases["student"]] * 3)
        encs = {role: {"train": encode_rows(toks[role], task["train"], args.max_len, prefixes[role]),
                       "dev": encode_rows(toks[role], task["dev"], args.max_len, prefixes[role]),
                       "test": {lang: encode_rows(toks[role], rows, args.max_len, prefixes[role])
                                for lang, rows in task["test"].items()},
                       "pad": data.special_ids(toks[role])["pad"]} for role in names}
        sizes = {"train": len(task["train"]), "dev": len(task["dev"]),
                 "test": {lang: len(rows) for lang, rows in task["test"].items()}}
        if rank == 0:
            print(f"[distill] {args.task}: {sizes}; {world} process(es) on {device}")
            for role, name in names.items():
                c = bases[role].config
                print(f"[distill] {role}: {name} ({c.num_hidden_layers} layers, width {c.hidden_size}, "
                      f"vocabulary {c.vocab_size}, prefix {prefixes[role]!r})")
        per_seed, logs, outcomes, best_dev, result = {}, {}, {}, {}, None
        zero_shot = [lang for lang in task["test"] if lang != task["train_lang"]]
        # the key differences: each approach minus vanilla fine-tuning; and the premise, the teacher minus the
        # student baseline in the training language (is the teacher really the stronger model there?)
        pairs = [(m, "baseline", name, sets) for m in METHODS[2:] for name, sets in
                 [("zero-shot avg", zero_shot), (task["train_lang"], [task["train_lang"]])]
                 if sets and all(x in task["test"] for x in sets)]
        pairs += [("teacher", "baseline", x, [x]) for x in [task["train_lang"]] if x in task["test"]]
        run.plan = [f"seed{seed}-{method}" for seed in args.seeds for method in METHODS]

        def publish(seed, method, record):          # results.json and .md after every finished unit
            nonlocal result
            per_seed.setdefault(seed, {})[method] = evaluate.with_averages(record["scores"], task["train_lang"])
            logs.setdefault(seed, {})[method] = record["log"]
            outcomes.setdefault(method, {})[seed] = record.get("outcomes", {})
            if rank != 0:
                return
            mean, std = evaluate.mean_std(per_seed)
            seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"mean ± std over seeds {args.seeds}"
            table = (f"{args.task} test {'macro-F1' if task['metric'] == 'macro_f1' else 'accuracy'} (%), trained on "
                     f"{task['train_lang']} only, model selection on English dev; {seeds}\n\n"
                     + evaluate.markdown_table(mean, std=std, averages=False))
            details = {"train_log": logs, "sizes": sizes, "world_size": world}
            comparisons = evaluate.compare(outcomes, pairs, why_not="macro-F1 is not a mean over sentences" if
                                           task["metric"] == "macro_f1" else None)
            result = evaluate.write_results(args, "distill.py", PAPER, per_seed, [table], details, device, t0, run,
                                            comparisons)
        for seed in args.seeds:
            run_seed(seed, task, bases, encs, toks, prefixes, args, device, rank, world, run, best_dev, publish)
        return result
    finally:
        model.close_distributed()


# -------------------- 5. Command line ------------------------------------------------------------------

def parse_args(argv=None):
    p = evaluate.add_common_args(
        evaluate.parser(__doc__), out_dir="out/distill", epochs=4, batch_size=32, lr=1e-4,
        langs_help="evaluation languages, comma-separated, or 'all' (default: sib200 evaluate.DEFAULT_SIB200_LANGS, "
                   "nusax all 12, xnli/pawsx every test-<lang>.tsv)",
        limit_help="use N English training rows, evenly spaced (default: all)")
    p.add_argument("--teacher", type=evaluate.nonempty, default="sentence-transformers/all-MiniLM-L6-v2",
                   help="the monolingual (English) teacher: hub name or directory")
    p.add_argument("--student", type=evaluate.nonempty, default="intfloat/multilingual-e5-small",
                   help="the multilingual student: hub name or directory")
    p.add_argument("--task", default="sib200", choices=("sib200", "xnli", "pawsx", "nusax"),
                   help="benchmark; xnli/pawsx read TSVs you provide (see the docstring)")
    p.add_argument("--student_layers", type=evaluate.positive_int, default=None, help="keep only the student's "
                   "bottom N blocks (ours, to make the teacher stronger: 4 does, README; default: all)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"), help="sentence vector of both models")
    p.add_argument("--alpha", type=evaluate.probability, default=0.5,
                   help="approach 1: weight a of the distillation term")
    p.add_argument("--temperature", type=evaluate.positive_float, default=2.0, help="approach 1: temperature T")
    p.add_argument("--beta", type=evaluate.nonneg_float, default=0.1,
                   help="approach 2: weight b of the representation loss")
    p.add_argument("--ridge", type=evaluate.nonneg_float, default=1.0,
                   help="approach 2: ridge of the map's least-squares start, x the mean eigenvalue")
    return evaluate.parse(p, argv)


if __name__ == "__main__":
    evaluate.cli(main)
