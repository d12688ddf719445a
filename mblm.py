"""mblm.py: one multilingual student, several monolingual teachers, and a zero-shot-aware objective.

Paper: Yang, Cui, Chen, Wang (2022), "Cross-Lingual Text Classification with Multilingual Distillation and
Zero-Shot-Aware Training" (MBLM, the multi-branch multilingual language model). From its abstract (we could
not read the rest): a multilingual student learns from several monolingual teachers at once; it has several
language branches, each a stack of Transformer layers; zero-shot-aware training also learns from the
mixture of the zero-shot representations of all the branches; only the task's supervised data is used.

Ours (a reconstruction, not read in the paper): the bottom L-k blocks are shared; on top, one branch of k
blocks per supervised language (copies of the pretrained top k blocks); one head. An example x of
supervised language l goes through branch l and learns from its label y and from teacher l:
    x' = Enc_{1..L-k}(x)        h_j = Branch_j(x')        z_j = Head(h_j)
    ell(z, y, t) = (1 - alpha) CE(z, y) + alpha T^2 H(softmax(t / T), softmax(z / T))      (Hinton et al.)
with t teacher l's logits (computed once, before the student trains), H the soft cross-entropy. The
zero-shot-aware term sends x through every *other* branch (x is zero-shot for them) and mixes their token
states with convex weights w (uniform; --mixture random: uniform on the simplex, per example):
    h~ = sum_{j != l} w_j h_j,        L(x) = ell(z_l, y, t) + lambda ell(Head(h~), y, t)
Inference: a supervised language through its own branch, any other through sum_j h_j / K. The baselines
are the K = 1 case (one top shared by all): vanilla multilingual fine-tuning (alpha = 0) and multi-teacher
distillation without branches. Also ours: k = 2, alpha = 0.5, T = 2, lambda = 1; only the top
--train_layers blocks of every model train (the frozen blocks' outputs are cached); the head has its own lr.
Teachers (--teachers LANG=NAME_OR_DIR,...): a saved xlt classifier is used as is, any other checkpoint is
first fine-tuned on its language's SIB-200 train split. The offline default German teacher is a STAND-IN:
multilingual-e5-small fine-tuned on German, NOT monolingual, and the student's own starting point.
Data: SIB-200 (7 topics); supervised = the train splits of the teachers' languages (translations of each
other); model selection on their mean dev accuracy; reported: test accuracy on --langs.
Teachers help only where they know more than the student: the run prints and keeps (the vanilla variant's
log, teacher_minus_student) each teacher's test accuracy minus the vanilla student's in its language. Our
construction, not the paper's, to make the teachers stronger: `--student_layers N` keeps only the
student's bottom N blocks; the stand-in German teacher keeps all of its blocks, and the saved classifiers
say num_hidden_layers N. (README: trained on German too, a 6-block student still matches the English
teacher; a 1-block one, with --branch_layers 1, falls clearly behind both teachers.)

Run (writes OUT_DIR/results.json, results.md, and the first seed's MBLM as OUT_DIR/mblm/<lang>, one
classifier per branch that model.load_with_head loads, with OUT_DIR/mblm/mblm.json):
    XLT_DATA=../shared/data python mblm.py        # eng + deu teachers, 4 variants; 14 min on one CPU core
    python mblm.py --teachers eng_Latn=sentence-transformers/all-MiniLM-L6-v2,deu_Latn=out/transfer/deu_Latn
    python mblm.py --student_layers 1 --branch_layers 1 --out_dir out/mblm-l1   # weaker student (ours)
    python mblm.py --device cuda --student xlm-roberta-base --train_layers 12 --lr 3e-5 --classifier_lr 1e-3 \\
        --epochs 5 --teachers eng_Latn=roberta-base,fra_Latn=camembert-base,deu_Latn=bert-base-german-cased
"""
import copy
import itertools
import math
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
from model import ClassificationHead, Encoder, XltError

PAPER = ("Yang, Cui, Chen, Wang (2022). Cross-Lingual Text Classification with Multilingual Distillation "
         "and Zero-Shot-Aware Training")
DEFAULT_STUDENT = "intfloat/multilingual-e5-small"
DEFAULT_TEACHERS = "eng_Latn=sentence-transformers/all-MiniLM-L6-v2,deu_Latn=intfloat/multilingual-e5-small"
VARIANTS = {  # name: (label, branches, alpha > 0 (teachers), zero-shot-aware term)
    "vanilla": ("vanilla multilingual fine-tuning", False, False, False),
    "multi_teacher": ("multi-teacher KD, no branches", False, True, False),
    "mblm_no_zs": ("MBLM w/o zero-shot-aware term", True, True, False),
    "mblm": ("MBLM (full)", True, True, True),
}
EVAL_BATCH = 64


# -------------------- 1. The model: a shared bottom, one branch per supervised language, one head ---------
class MBLM(nn.Module):
    """Shared bottom = the encoder's first L-k blocks; branches = K copies of its top k blocks, one per
    supervised language of `langs`, in order (None or []: one top shared by all, the plain encoder).
    A batch may carry the `frozen` bottom blocks' cached output as batch["states"] (frozen_states)."""

    def __init__(self, encoder, langs, branch_layers, num_labels, pooling="mean", frozen=0):
        super().__init__()
        L, k = encoder.config.num_hidden_layers, branch_layers
        if not 1 <= k <= L:
            raise XltError(f"--branch_layers must be in 1..{L} (the encoder has {L} blocks), got {k}")
        if not 0 <= frozen <= L - k:
            raise XltError(f"cannot freeze {frozen} blocks: only {L - k} are below the {k}-block branches")
        self.config, self.n_shared, self.frozen, self.langs = encoder.config, L - k, frozen, list(langs or [])
        self.branches = nn.ModuleList(copy.deepcopy(encoder.layers[L - k:]) for _ in range(max(1, len(self.langs))))
        # The encoder keeps only the shared bottom: its own top k blocks live on as the branches' copies.
        encoder.layers, self.encoder = encoder.layers[:L - k], encoder
        self.head = ClassificationHead(encoder.config.hidden_size, num_labels, pooling,
                                       encoder.config.hidden_dropout_prob)

    def route(self, lang):
        """The branch index of a supervised language; None (= the mixture of all branches) for any other."""
        return self.langs.index(lang) if lang in self.langs else None

    def bottom(self, batch):
        """(x', key mask) after the shared blocks, from cached frozen states when the batch has them."""
        mask = batch["attention_mask"].bool()[:, None, None, :]
        if "states" not in batch:
            return self.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                layers=self.n_shared), mask
        x = batch["states"]
        for block in self.encoder.layers[self.frozen:]:
            x = block(x, mask)
        return x, mask

    def branch(self, j, x, mask):
        for block in self.branches[j]:
            x = block(x, mask)
        return x

    def mixture(self, x, mask, branches, weights):
        """sum_j weights[:, j] * Branch_{branches[j]}(x'): weights (B, len(branches)) are convex per example."""
        return sum(weights[:, n, None, None] * self.branch(j, x, mask) for n, j in enumerate(branches))

    def forward(self, batch, lang):
        """Inference logits: a supervised language through its own branch, any other through the uniform
        mixture of all branches (as the zero-shot-aware term trains them)."""
        x, mask = self.bottom(batch)
        j, K = self.route(lang), len(self.branches)
        h = (self.branch(j, x, mask) if j is not None else
             self.mixture(x, mask, range(K), mixture_weights(x.shape[0], K, "uniform", x.device)))
        return self.head(h, batch["attention_mask"])

    def as_encoder(self, j):
        """Branch j as a standalone Encoder (shared bottom + branch j's blocks, the modules themselves)."""
        with torch.device("meta"):     # no memory or random init for modules that are replaced right away
            enc = Encoder(self.config)
        enc.embed = self.encoder.embed
        enc.layers = nn.ModuleList(list(self.encoder.layers) + list(self.branches[j]))
        return enc


def mixture_weights(batch_size, n, mode, device):
    """(B, n) convex weights, one row per example: 'uniform' = 1/n each; 'random' = uniform on the simplex
    (Dirichlet(1, ..., 1)), drawn as Exp(1) variables divided by their sum. Drawn on the device, no sync."""
    if mode == "uniform":
        return torch.full((batch_size, n), 1.0 / n, device=device)
    if mode == "random":
        e = torch.empty(batch_size, n, device=device).exponential_()
        return e / e.sum(1, keepdim=True)
    raise XltError(f"--mixture must be 'uniform' or 'random', got {mode!r}")


def freeze(m, train_embeddings=False):
    """Frozen: the `m.frozen` bottom blocks and, if any block is frozen, all of the embeddings (their output
    is cached); otherwise only the word-embedding matrix, unless train_embeddings."""
    if m.frozen > 0:
        m.encoder.embed.requires_grad_(False)
    elif not train_embeddings:
        m.encoder.embed.word.weight.requires_grad_(False)
    for block in m.encoder.layers[:m.frozen]:
        block.requires_grad_(False)


def save_mblm(m, out_dir, tok, extra=None):
    """One Hugging Face-layout classifier per branch, out_dir/<lang> (shared bottom + that branch + head,
    for `evaluate.py --model out_dir/<lang>`), and mblm.json; `extra` goes into every config.json too."""
    out_dir = Path(out_dir)
    names = m.langs or ["shared"]
    for j, name in enumerate(names):
        model.save_pretrained(m.as_encoder(j), out_dir / name, tokenizer=tok, head=m.head,
                              extra={"mblm": {"langs": m.langs, "branch": name}, **(extra or {})})
    evaluate.write_json(out_dir / "mblm.json", {"langs": m.langs, "branch_layers": len(m.branches[0]),
                                                "dirs": names, **(extra or {})})


# -------------------- 2. The objective -------------------------------------------------------------------
def distill_loss(logits, labels, teacher_logits, alpha, temperature):
    """ell(z, y, t) = (1 - alpha) CE(z, y) + alpha T^2 H(softmax(t/T), softmax(z/T)).
    The T^2 keeps the soft term's gradient on the scale of the hard one (Hinton et al. 2015, Sec. 2)."""
    hard = F.cross_entropy(logits.float(), labels)
    if alpha == 0:
        return hard
    T = temperature
    soft = -(F.softmax(teacher_logits.float() / T, -1) * F.log_softmax(logits.float() / T, -1)).sum(-1).mean()
    return (1 - alpha) * hard + alpha * T * T * soft


def mblm_loss(m, batch, lang, alpha, temperature, zs_weight, mixture="uniform"):
    """The loss of one batch of language `lang`: ell through its own branch, plus zs_weight times ell of
    the mixture of the other branches (the zero-shot-aware term), both against teacher `lang`."""
    x, mask = m.bottom(batch)
    j = m.route(lang)
    if j is None and len(m.branches) > 1:
        raise XltError(f"{lang} is not a supervised language of this model (its branches: {', '.join(m.langs)})")
    h = m.branch(0 if j is None else j, x, mask)     # j is None: a model without branches, its one top
    t = batch.get("teacher_logits")
    loss = distill_loss(m.head(h, batch["attention_mask"]), batch["label"], t, alpha, temperature)
    if zs_weight > 0:
        others = [i for i in range(len(m.branches)) if i != j]
        if j is None or not others:
            raise XltError("the zero-shot-aware term needs branches and at least two supervised languages")
        w = mixture_weights(x.shape[0], len(others), mixture, x.device)
        h_zs = m.mixture(x, mask, others, w)
        loss = loss + zs_weight * distill_loss(m.head(h_zs, batch["attention_mask"]), batch["label"], t,
                                               alpha, temperature)
    return loss


# -------------------- 3. Examples, cached frozen states, batches ----------------------------------------
def collate(examples, pad_id, device):
    """data.pad_batch, plus the examples' cached 'states' (zero-padded, gathered on the device in one
    indexing op) and 'teacher_logits', if they have them."""
    batch = data.to_device(data.pad_batch(examples, pad_id), device)
    if "states" in examples[0]:
        table = examples[0]["states"]["table"]
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        starts = torch.tensor([e["states"]["start"] for e in examples])
        t = torch.arange(batch["input_ids"].shape[1])
        rows = torch.where(t < lengths[:, None], starts[:, None] + t, len(table) - 1)    # padding: the zero row
        batch["states"] = table[rows.to(table.device, non_blocking=True)]
    if "teacher_logits" in examples[0]:
        batch["teacher_logits"] = torch.stack([e["teacher_logits"] for e in examples]).to(device)
    return batch


def frozen_states(encoder, examples, n_blocks, pad_id, device, desc="cache"):
    """Cache the output of the encoder's first n_blocks blocks for every example: the token states of all
    examples, unpadded, in one float32 (tokens + 1, H) table on `device` whose last row is zeros (the
    padding), and in each example 'states' = {'table': table, 'start': its first row}. The frozen blocks never
    change, so this runs once per model and dataset, and a training step gathers its batch from the table (collate)."""
    if n_blocks == 0:
        return
    parts = [None] * len(examples)
    with model.evaluating(encoder):
        for idx in tqdm(evaluate.length_batches(examples, EVAL_BATCH), desc=desc, leave=False):
            batch = collate([examples[i] for i in idx], pad_id, device)
            with model.autocast(device):
                h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], layers=n_blocks)
            for row, i in enumerate(idx):
                parts[i] = h[row, :len(examples[i]["input_ids"])].float()
    table = torch.cat(parts + [parts[0].new_zeros(1, parts[0].shape[1])])
    for e, start in zip(examples, itertools.accumulate([0] + [len(x) for x in parts[:-1]])):
        e["states"] = {"table": table, "start": start}


def predict(m, examples, lang, pad_id, device):
    """(logits (N, C) float32 on the CPU, in the examples' order) of model m routed for `lang`."""
    device, out = torch.device(device), torch.zeros(len(examples), m.head.num_labels)
    with model.evaluating(m):
        for idx in evaluate.length_batches(examples, EVAL_BATCH):
            batch = collate([examples[i] for i in idx], pad_id, device)
            with model.autocast(device):
                out[idx] = m(batch, lang).float().cpu()
    return model.finite(out, f"the {lang} branch's outputs")


def accuracies(m, sets, pad_id, device, outcomes=False):
    """{lang: accuracy in percent} of m on sets = {lang: examples}, each routed by its language; outcomes: and
    {lang: per-example outcomes} (evaluate.hits)."""
    preds = {lang: predict(m, ex, lang, pad_id, device).argmax(-1).tolist() for lang, ex in sets.items()}
    labels = {lang: [e["label"] for e in ex] for lang, ex in sets.items()}
    scores = {lang: evaluate.accuracy(preds[lang], labels[lang]) for lang in sets}
    return (scores, {lang: evaluate.hits(preds[lang], labels[lang]) for lang in sets}) if outcomes else scores


def language_batches(train_sets, batch_size, seed, epoch):
    """[(lang, index batch)]: every language's examples in length-bucketed batches of that language
    alone (one branch per batch), the languages' batches interleaved at random."""
    out = [(lang, idx) for n, (lang, ex) in enumerate(train_sets.items())
           for idx in data.bucket_batches([len(e["input_ids"]) for e in ex], batch_size, seed + 1000 * n, epoch)]
    return [out[i] for i in np.random.default_rng([seed, epoch, 7]).permutation(len(out))]


# -------------------- 4. The training loop (teachers and students alike) --------------------------------
def train(m, train_sets, dev_sets, args, device, pad_id, seed, alpha=0.0, zs_weight=0.0, epochs=None, desc="train"):
    """Fine-tune m on train_sets = {lang: examples}; after every epoch, the mean dev accuracy over dev_sets'
    languages selects the best epoch, whose trainable weights m ends with. Returns the log (dev, loss)."""
    epochs = epochs or args.epochs
    freeze(m, args.train_embeddings)
    m.to(device).train()
    if args.compile:
        model.compile_blocks(m)
    # The head learns at --classifier_lr, the blocks at --lr: e5's sentence vectors are nearly parallel,
    # and a fresh head at the blocks' rate needs many epochs to separate them (README.md).
    opt = model.configure_optimizer([m.encoder, m.branches], args.lr, args.weight_decay)
    for group in model.configure_optimizer([m.head], args.classifier_lr, args.weight_decay).param_groups:
        opt.add_param_group(group)
    # Every epoch's batches, made once: their count is also the length of the learning-rate schedule.
    schedule = [language_batches(train_sets, args.batch_size, seed, e) for e in range(epochs)]
    total = sum(len(batches) for batches in schedule)
    warmup, step, best = math.ceil(args.warmup * total), 0, None
    losses, log = model.LossLog(args.log_every, total, desc, opt), {"dev": [], "loss": []}
    for epoch, batches in enumerate(schedule):
        for lang, idx in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            model.set_lr(opt, model.lr_schedule(step, total, warmup))
            batch = collate([train_sets[lang][i] for i in idx], pad_id, device)
            with model.autocast(device):
                loss = mblm_loss(m, batch, lang, alpha, args.temperature, zs_weight, args.mixture)
            loss.backward()
            model.optimizer_step(opt)
            step += 1
            if (window := losses.add(loss)) is not None:
                log["loss"].append([step, round(window[0], 4)])
                tqdm.write(f"[{desc}] step {step}/{total}  loss {window[0]:.4f}")
        losses.check()                                  # divergence: reported with its step, before scoring
        dev = accuracies(m, dev_sets, pad_id, device)
        mean = sum(dev.values()) / len(dev)
        log["dev"].append({"epoch": epoch + 1, **{k: round(v, 2) for k, v in dev.items()}, "mean": round(mean, 2)})
        tqdm.write(f"[{desc}] epoch {epoch + 1}/{epochs}: dev " + ", ".join(f"{k} {v:.1f}" for k, v in dev.items()))
        if best is None or mean > best[0]:
            best = (mean, epoch + 1, model.trainable_state(m))
    losses.finish()
    model.restore(best[2])
    log["best_epoch"] = best[1]
    return log


# -------------------- 5. Teachers and checkpoints -------------------------------------------------------
def parse_teachers(arg):
    """'eng_Latn=NAME,fra_Latn=DIR' -> {lang: name}, in order."""
    items = [[part.strip() for part in item.split("=", 1)] for item in arg.split(",")]
    if any(len(item) != 2 or not all(item) for item in items):
        raise XltError(f"--teachers: expected LANG=NAME_OR_DIR items separated by commas, got {arg!r}")
    if len(dict(items)) < len(items):
        raise XltError(f"--teachers: a language is given twice in {arg!r}")
    return dict(items)


class Checkpoint:
    """A checkpoint loaded once: its pristine encoder, its head if it is a saved xlt classifier (used as a
    teacher as is), tokenizer, prefix, and its SIB-200 examples with their cached frozen states."""

    def __init__(self, name, args, data_dir, device, layers=None):
        """layers: keep only the bottom blocks (--student_layers; model.keep_layers)."""
        self.name, self.args, self.data_dir, self.device, self.sets = name, args, data_dir, device, {}
        path = model.resolve_checkpoint(name)
        if path.is_dir() and "xlt_head" in model.read_json(path / "config.json"):
            self.encoder, self.head, _ = model.load_with_head(path, dropout=args.dropout)
            if (self.head.describe()["type"], self.head.num_labels) != ("sequence", len(data.SIB200_LABELS)):
                raise XltError(f"--teachers {name}: its head is not a {len(data.SIB200_LABELS)}-way SIB-200 classifier")
        else:
            self.encoder, self.head = Encoder.from_pretrained(name, dropout=args.dropout), None
        if layers:
            model.keep_layers(self.encoder, layers)
        self.encoder.to(device)                     # every model is copied from it (fresh) where it will run
        self.tok = data.load_tokenizer(name)
        self.pad_id, self.prefix = data.special_ids(self.tok)["pad"], evaluate.resolve_prefix(args.prefix, name)
        evaluate.check_max_len(args.max_len, self.encoder, name)
        L = self.encoder.config.num_hidden_layers
        if args.branch_layers > L:
            raise XltError(f"--branch_layers {args.branch_layers}: {name} has only {L} blocks")
        self.frozen = max(0, L - args.train_layers)
        if args.train_embeddings and self.frozen:
            raise XltError(f"--train_embeddings: {name} has {L} blocks; with --train_layers {args.train_layers} the "
                           f"embeddings sit below frozen blocks (use --train_layers {L})")

    def examples(self, lang, split):
        """SIB-200 examples of (lang, split): --limit rows of train, --eval_limit of dev and test (evenly
        spaced), with their frozen states, computed once."""
        if (lang, split) not in self.sets:
            rows = data.subset(data.read_sib200(self.data_dir, lang, split),
                               self.args.limit if split == "train" else self.args.eval_limit)
            ex = data.encode_rows(self.tok, rows, self.args.max_len, self.prefix)
            frozen_states(self.encoder, ex, self.frozen, self.pad_id, self.device,
                          f"frozen blocks {lang} {split}")
            self.sets[(lang, split)] = ex
        return self.sets[(lang, split)]

    def fresh(self, langs):
        """A new MBLM from a copy of the pristine encoder (branches for langs, or one shared top)."""
        m = MBLM(copy.deepcopy(self.encoder), langs, self.args.branch_layers, len(data.SIB200_LABELS),
                 frozen=self.frozen)
        m.head = m.head if self.head is None else copy.deepcopy(self.head)
        return m


def make_teacher(lang, src, args, seed, device):
    """(teacher logits on lang's train split (N, C), info, {lang: test outcomes}): a saved classifier as is, else
    src fine-tuned on lang's SIB-200 train split first (model selection on its dev split)."""
    t0, m, ex = time.time(), src.fresh(None), src.examples(lang, "train")
    info = {"checkpoint": src.name, "fine_tuned_here": src.head is None}
    if src.head is None:
        info["log"] = train(m, {lang: ex}, {lang: src.examples(lang, "dev")}, args, device, src.pad_id, seed,
                            epochs=args.teacher_epochs, desc=f"teacher {lang}")
    logits = predict(m.to(device), ex, lang, src.pad_id, device)
    info["train_accuracy"] = evaluate.accuracy(logits.argmax(-1).tolist(), [e["label"] for e in ex])
    scores, tested = accuracies(m, {lang: src.examples(lang, "test")}, src.pad_id, device, outcomes=True)
    info.update(test_accuracy=scores[lang], seconds=round(time.time() - t0, 1))
    stand_in = " (a STAND-IN: the student's own multilingual checkpoint)" if src.name == args.student else ""
    print(f"[mblm] teacher {lang} {src.name}{stand_in}: test accuracy {info['test_accuracy']:.1f}")
    return logits, info, tested


# -------------------- 6. The experiment -----------------------------------------------------------------
def main(argv=None):
    t0, args = time.time(), parse_args(argv)
    device, data_dir = model.pick_device(args.device), data.resolve_data_dir(args.data_dir)
    teachers = parse_teachers(args.teachers)
    supervised = list(teachers)                     # one branch each, in this order
    if len(supervised) < 2 and "mblm" in args.variants:
        raise XltError("--variants mblm (the zero-shot-aware term) needs at least two languages in --teachers")
    if bad := [x for x in supervised if x not in data.sib200_languages(data_dir)]:
        raise XltError(f"--teachers: SIB-200 has no language {', '.join(bad)} (codes like eng_Latn)")
    langs = evaluate.resolve_langs(args.langs, "sib200", data_dir, default=supervised + [
        x for x in evaluate.DEFAULT_SIB200_LANGS if x not in supervised])
    if missing := [x for x in supervised if x not in langs]:
        raise XltError(f"--langs must include the supervised languages (of --teachers); missing {', '.join(missing)}")
    zero_shot = [x for x in langs if x not in supervised]
    run = evaluate.RunFolder(args, "mblm.py", selectors=("variants",))    # checked and locked before training
    # Every checkpoint is loaded (and checked) once, before any training; its cached examples serve all seeds.
    ckpt = {n: Checkpoint(n, args, data_dir, device) for n in dict.fromkeys(teachers.values())}
    student = ckpt[args.student] if args.student in ckpt and not args.student_layers else \
        Checkpoint(args.student, args, data_dir, device, args.student_layers)   # cut down: not its stand-in teacher
    saved = "mblm" if "mblm" in args.variants else args.variants[-1]
    if not args.no_save:
        run.need(*[student.encoder] * len(supervised))               # one classifier per branch
    per_seed, details, outcomes = {}, {"supervised": supervised, "zero_shot": zero_shot, "seeds": {}}, {}
    # the key differences, and the premise: each teacher minus the vanilla student in the teacher's language
    pairs = [(m, b, name, sets) for m, b in (("mblm", "vanilla"), ("mblm", "mblm_no_zs"), ("multi_teacher", "vanilla"))
             for name, sets in (("zero-shot avg", zero_shot), ("supervised avg", supervised)) if sets]
    pairs += [("teachers", "vanilla", x, [x]) for x in supervised]
    run.plan = [f"seed{seed}-{u}" for seed in args.seeds for u in [f"teacher-{x}" for x in supervised] + args.variants]
    result = None

    def publish(seed, name, row, log, tested=None):     # results.json and .md after every finished unit
        nonlocal result
        if tested:                                      # the teachers' (one language each) pooled as one row
            outcomes.setdefault("teachers" if name in teachers else name, {}).setdefault(seed, {}).update(tested)
        rows, logs = per_seed.setdefault(seed, {}), details["seeds"].setdefault(str(seed), {})
        if name in teachers:
            rows.setdefault("teachers", {})[name], logs.setdefault("teachers", {})[name] = row, log
            if len(rows["teachers"]) == len(supervised):
                rows["teachers"]["supervised avg"] = sum(rows["teachers"].values()) / len(supervised)
        else:
            rows[name], logs[name] = row, log
        mean, std = evaluate.mean_std(per_seed)
        label = {"teachers": "teachers (each on its own language)", **{n: v[0] for n, v in VARIANTS.items()}}
        cols = supervised + ["supervised avg", "zero-shot avg"]
        summary = evaluate.markdown_table({label[n]: {c: r.get(c) for c in cols} for n, r in mean.items()},
                                          std={label[n]: s for n, s in std.items()}, averages=False)
        per_lang = evaluate.markdown_table({label[n]: {x: mean[n][x] for x in langs} for n in args.variants
                                            if n in mean}, std={label[n]: std[n] for n in args.variants if n in std})
        tables = ["SIB-200 test accuracy (supervised languages through their branch, the others zero-shot):\n\n"
                  + summary, "Per language (zero-shot languages through the uniform mixture of the branches):\n\n"
                  + per_lang]
        result = evaluate.write_results(args, "mblm.py", PAPER, per_seed, tables, details, device, t0, run,
                                        evaluate.compare(outcomes, pairs))

    for seed in args.seeds:
        # 1. Teachers: soft targets on their language's train split, computed once and kept with the unit.
        soft = {}
        for lang, name in teachers.items():
            if (record := run.done(f"seed{seed}-teacher-{lang}")) is None:
                model.set_seed(seed)
                logits, info, tested = make_teacher(lang, ckpt[name], args, seed, device)
                record = run.finish(f"seed{seed}-teacher-{lang}", {"log": info, "outcomes": tested}, {"logits": logits})
            soft[lang] = record["tensors"]["logits"].to(device)
            publish(seed, lang, record["log"]["test_accuracy"], record["log"], record.get("outcomes", {}))
        # 2. The variants: the same student checkpoint, data and soft targets; one set of branches, or none.
        train_sets = {lang: [dict(e, teacher_logits=t) for e, t in zip(student.examples(lang, "train"), soft[lang])]
                      for lang in supervised}
        dev_sets = {lang: student.examples(lang, "dev") for lang in supervised}
        test_sets = {lang: student.examples(lang, "test") for lang in langs}
        for name in args.variants:
            if (record := run.done(f"seed{seed}-{name}")) is None:
                (_, branches, distil, zs), tv = VARIANTS[name], time.time()
                model.set_seed(seed)
                m = student.fresh(supervised if branches else None)
                log = train(m, train_sets, dev_sets, args, device, student.pad_id, seed, alpha=args.alpha if distil
                            else 0.0, zs_weight=args.zs_weight if zs else 0.0, desc=name)
                scores, tested = accuracies(m, test_sets, student.pad_id, device, outcomes=True)
                row = {**scores, "supervised avg": sum(scores[x] for x in supervised) / len(supervised),
                       "zero-shot avg": sum(scores[x] for x in zero_shot) / len(zero_shot) if zero_shot else None}
                log["seconds"] = round(time.time() - tv, 1)
                if name == "vanilla":     # the premise: is each teacher stronger in its language than the student?
                    teacher_test = per_seed[seed]["teachers"]           # published with the teachers above
                    log["teacher_minus_student"] = {x: round(teacher_test[x] - scores[x], 2) for x in supervised}
                    print(f"[mblm] seed {seed}: teacher minus student (vanilla), test: " + ", ".join(
                        f"{x} {v:+.1f}" for x, v in log["teacher_minus_student"].items()))
                print(f"[mblm] seed {seed}, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                                  if "avg" in k and v is not None))
                if not args.no_save and seed == args.seeds[0] and name == saved:
                    save_mblm(m, Path(args.out_dir) / name, student.tok,
                              extra={"variant": name, "seed": seed, "xlt_prefix": student.prefix})
                del m                                   # before the next variant's copy: one student in memory
                record = run.finish(f"seed{seed}-{name}", {"row": row, "log": log, "outcomes": tested})
            publish(seed, name, record["row"], record["log"], record.get("outcomes", {}))
    return result


def parse_args(argv):
    p = evaluate.add_common_args(
        evaluate.parser(__doc__), out_dir="out/mblm", epochs=3, batch_size=32, lr=3e-4, seeds=(0,),
        langs_help="comma-separated SIB-200 test languages, or 'all'; must include the --teachers languages "
                   "(default: those and evaluate.DEFAULT_SIB200_LANGS); the others are zero-shot",
        limit_help="use N training rows per supervised language, evenly spaced")
    p.add_argument("--teachers", type=evaluate.name_list, default=DEFAULT_TEACHERS, help="LANG=NAME_OR_DIR,... one "
                   "per supervised language, fine-tuned on LANG's SIB-200 train split unless a saved xlt classifier "
                   "(German: a stand-in)")
    p.add_argument("--student", type=evaluate.nonempty, default=DEFAULT_STUDENT,
                   help="the multilingual checkpoint the student starts from")
    p.add_argument("--student_layers", type=evaluate.positive_int, default=None, help="keep only the student's "
                   "bottom N blocks (ours, to make the teachers stronger: 1 does, README; default: all)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                   help=f"which of {', '.join(VARIANTS)} to train; the first seed's mblm (else the last one) is saved")
    p.add_argument("--branch_layers", type=evaluate.positive_int, default=2, help="k: blocks per language branch")
    p.add_argument("--train_layers", type=evaluate.positive_int, default=4, help="fine-tune only the top N blocks "
                   "of every model (>= k); the outputs of the frozen ones are cached")
    p.add_argument("--alpha", type=evaluate.probability, default=0.5, help="weight of the soft (teacher) term in ell")
    p.add_argument("--temperature", type=evaluate.positive_float, default=2.0, help="distillation temperature T")
    p.add_argument("--zs_weight", type=evaluate.nonneg_float, default=1.0, help="lambda: zero-shot-aware term's weight")
    p.add_argument("--mixture", default="uniform", choices=["uniform", "random"], help="the other branches' "
                   "mixture weights in training: uniform, or uniform on the simplex per example")
    p.add_argument("--teacher_epochs", type=evaluate.positive_int, default=3, help="for teachers fine-tuned here")
    p.add_argument("--classifier_lr", type=evaluate.positive_float, default=3e-3, help="the head's peak learning rate")
    args = evaluate.parse(p, argv)
    if args.train_layers < args.branch_layers:
        raise XltError(f"--train_layers ({args.train_layers}) must be >= --branch_layers ({args.branch_layers})")
    return args


if __name__ == "__main__":
    evaluate.cli(main)
