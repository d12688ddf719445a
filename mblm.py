"""mblm.py: one multilingual student, several monolingual teachers, and a zero-shot-aware objective.

Paper: Ziqing Yang, Yiming Cui, Zhigang Chen, Shijin Wang (2022), "Cross-Lingual Text Classification with
Multilingual Distillation and Zero-Shot-Aware Training" (MBLM, the multi-branch multilingual language model).

What the paper fixes (its abstract; we could not read the rest of the text):
  - a teacher-student framework in which a multilingual student learns from several monolingual teachers
    at once;
  - the student, MBLM, is a multilingual pretrained model with multiple language branches, each branch a
    stack of transformer layers;
  - zero-shot-aware training: the model also learns from the mixture of the zero-shot representations of
    all the branches;
  - only the task's supervised data is used, and both supervised and zero-shot accuracy improve.

Our reconstruction (every detail below is our choice, not read in the paper):
  - the student's bottom L-k blocks are shared; on top there is one branch of k blocks per supervised
    language, each initialised as a copy of the pretrained top k blocks; one classifier head is shared;
  - an example x of supervised language l goes through branch l and learns from gold label y and teacher l:
        x' = Enc_{1..L-k}(x)                 h_j = Branch_j(x')            z_j = Head(h_j)
        ell(z, y, t) = (1 - alpha) CE(z, y) + alpha T^2 H(softmax(t / T), softmax(z / T))      (Hinton et al.)
    with t the logits of teacher l on x (computed once, before the student trains) and H the cross-entropy
    between the softened distributions (the soft cross-entropy);
  - zero-shot-aware term: the same x through every *other* branch (x is zero-shot for them), their token
    states mixed with convex weights w (uniform by default, --mixture random draws w uniformly on the
    simplex per example), classified by the same head and distilled from teacher l as well:
        h~ = sum_{j != l} w_j h_j,     L(x) = ell(z_l, y, t) + lambda ell(Head(h~), y, t)
    Mixing token states equals mixing sentence vectors, because mean (or [CLS]) pooling is linear;
  - inference: a supervised language uses its own branch; every other language the uniform mixture of all
    branches, sum_j h_j / K, as in training;
  - a model "without branches" is the K = 1 case: one top of k blocks shared by every language. It gives the
    two baselines of the comparison: vanilla multilingual fine-tuning (alpha = 0) and multi-teacher
    distillation without branches.

Teachers (`--teachers lang=NAME_OR_DIR,...`, one per supervised language): a directory saved with a
classification head (model.save_pretrained(..., head=...)) is used as it is; any other checkpoint that
model.py loads is first fine-tuned on its language's SIB-200 train split (gold labels, model selection on
its dev split). Offline default, and its limits, said plainly:
  - eng_Latn: sentence-transformers/all-MiniLM-L6-v2, a truly monolingual English model;
  - deu_Latn: intfloat/multilingual-e5-small fine-tuned on German SIB-200 only. It is a STAND-IN in the
    role of a monolingual German teacher: it is NOT monolingual (it was pretrained on ~100 languages), and
    it is the very checkpoint the student starts from, so it brings no knowledge the student lacks beyond
    having specialised on German. No monolingual German checkpoint ships offline. transfer.py (RAMEN)
    makes a German model out of English MiniLM (a German vocabulary on MiniLM's encoder, further trained
    with MLM on English and a little German: no third language involved, but weak at our corpus size);
    after `python transfer.py` (default deu_Latn) use
    `--teachers eng_Latn=sentence-transformers/all-MiniLM-L6-v2,deu_Latn=out/transfer/deu_Latn`
    (a plain encoder, fine-tuned here on German SIB-200; its deu_Latn-classifier directory has a head but
    never saw a labelled German sentence, so it makes a poor teacher).
With two supervised languages the "mixture of the other branches" in training is the one other branch;
a third teacher (e.g. fra_Latn=...) makes it a real mixture, and only then does --mixture random matter.

Data: SIB-200 (7 topics). Supervised data = the train split of every supervised language. SIB-200 is
built on FLORES, so the training sets of the languages are translations of each other (parallel): the
student sees each sentence once per supervised language. Model selection: mean accuracy on the dev splits
of the supervised languages (never test). Reported: test accuracy on each supervised language (through its
branch) and on the other languages of --langs (zero-shot, through the mixture).

CPU budget choices (ours): only the top --train_layers blocks of every model (teachers and student) are
fine-tuned; the blocks below are frozen, so their outputs are computed once and cached, and every
training and evaluation pass starts from the cache. With the default (k = 2, 4 trained blocks of e5's 12)
the student trains 2 shared blocks + 2 blocks per branch. `--train_layers 12` fine-tunes every block as the
paper does (then nothing is cached). k = 2 (--branch_layers) is chosen by measured cost: a full-MBLM step
runs (4 - k) trained shared blocks + k own + k (K - 1) zero-shot branch blocks, so with K = 2 it costs
1.5x a plain step at k = 2 (measured on one core: 1.08 vs 0.72 ms per token) and 2x at k = 4, where the
shared part would moreover be frozen entirely; k = 2 keeps 2 trained shared blocks that every branch's
gradient reaches. The word-embedding matrix stays frozen unless --train_embeddings
(the 250k-row matrix dominates a CPU optimizer step, and rows of languages absent from the training data
should not drift). multilingual-e5 inputs get its "query: " prefix (evaluate.resolve_prefix).
Learning rates (ours, measured): the head learns at --head_lr 3e-3, the blocks at --lr 3e-4 (AdamW, weight
decay 0.01, 10% linear warmup then linear decay, clipping at 1.0, batch 32, 3 epochs). e5's sentence
vectors are nearly parallel (mean cosine 0.77 between SIB-200 dev sentences; MiniLM's: 0.04), and a fresh
head at the blocks' rate needs many epochs to separate them. German dev accuracy of e5 (top 4 blocks)
after 2 epochs on German train: head/blocks lr 1e-4/1e-4: 62.6; 1e-3/1e-4: 71.7; 3e-3/1e-4: 82.8;
3e-3/3e-4: 84.8; 9e-3/3e-4: 86.9 (99 dev sentences: +-1 sentence is 1 point).
Soft targets, alpha = 0.5, T = 2 and lambda = 1 are our choices too (alpha and T as in distill.py).

Outputs (OUT_DIR = --out_dir, default out/mblm):
  OUT_DIR/results.json   config, teachers (checkpoint, dev history, train/test accuracy), per variant the
                         test accuracy of every language, supervised and zero-shot averages, dev history.
  OUT_DIR/mblm/<lang>    the full MBLM's dev-best model, one Hugging Face-layout classifier per branch
                         (shared bottom + that branch + head; model.load_with_head loads it), and
                         OUT_DIR/mblm/mblm.json; load_mblm(OUT_DIR/mblm) rebuilds the multi-branch model
                         with its mixture path. (If --variants leaves mblm out, the last variant instead.)

Run:
    XLT_DATA=../shared/data python mblm.py           # offline default: eng + deu teachers, 4 variants; 14 min on ONE CPU core
    python mblm.py --teachers eng_Latn=sentence-transformers/all-MiniLM-L6-v2,deu_Latn=out/transfer/deu_Latn
    # with internet, on a GPU: real monolingual teachers, full fine-tuning of every model
    python mblm.py --device cuda --student xlm-roberta-base --train_layers 12 --lr 3e-5 --head_lr 1e-3 \
        --epochs 5 --teachers eng_Latn=roberta-base,fra_Latn=dbmdz/bert-base-french-europeana-cased,\
deu_Latn=bert-base-german-cased,zho_Hans=bert-base-chinese
    (camembert-base, the usual French choice, loads too: model.py reads model_type "camembert" as the
    RoBERTa it is.)
"""
import argparse
import copy
import json
import math
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
from model import ClassificationHead, Encoder, XltError

DEFAULT_STUDENT = "intfloat/multilingual-e5-small"
DEFAULT_TEACHERS = "eng_Latn=sentence-transformers/all-MiniLM-L6-v2,deu_Latn=intfloat/multilingual-e5-small"
VARIANTS = {  # name: (branches, alpha > 0 (teachers), zero-shot-aware term)
    "vanilla": (False, False, False),       # multilingual fine-tuning on the supervised languages
    "multi_teacher": (False, True, False),  # multi-teacher distillation, no branches
    "mblm_no_zs": (True, True, False),      # MBLM without the zero-shot-aware term
    "mblm": (True, True, True),             # full MBLM
}
LABELS = {"vanilla": "vanilla multilingual fine-tuning", "multi_teacher": "multi-teacher KD, no branches",
          "mblm_no_zs": "MBLM w/o zero-shot-aware term", "mblm": "MBLM (full)"}


# ----------------------------------------------------------------------------------------------------
# 1. The model: a shared bottom, one branch per supervised language, one head
# ----------------------------------------------------------------------------------------------------

class MBLM(nn.Module):
    """Shared bottom = the encoder's first L-k blocks; branches = K copies of its top k blocks.

    langs: the supervised languages, one branch each, in order; None (or []) builds a single top shared by
    every language, i.e. the plain encoder (the baselines, and the teachers). `frozen` says how many bottom
    blocks are frozen: a batch may carry their cached output as batch["states"] (see frozen_states)."""

    def __init__(self, encoder, langs, branch_layers, num_labels, pooling="mean", frozen=0):
        super().__init__()
        L, k = encoder.config.num_hidden_layers, branch_layers
        if not 1 <= k <= L:
            raise XltError(f"--branch_layers must be in 1..{L} (the encoder has {L} blocks), got {k}")
        if not 0 <= frozen <= L - k:
            raise XltError(f"cannot freeze {frozen} blocks: only {L - k} are below the {k}-block branches")
        self.config, self.n_shared, self.frozen = encoder.config, L - k, frozen
        self.langs = list(langs or [])
        top = encoder.layers[L - k:]
        self.branches = nn.ModuleList(copy.deepcopy(top) for _ in range(max(1, len(self.langs))))
        # The encoder keeps only the shared bottom: its own top k blocks live on as the branches' copies.
        encoder.layers = encoder.layers[:L - k]
        self.encoder = encoder
        self.head = ClassificationHead(encoder.config.hidden_size, num_labels, pooling)

    def route(self, lang):
        """The branch index of a supervised language; None (= the mixture of all branches) for any other."""
        return self.langs.index(lang) if lang in self.langs else None

    def bottom(self, batch):
        """(x', key mask) after the shared blocks, from cached frozen states when the batch has them."""
        mask = batch["attention_mask"].bool()[:, None, None, :]
        if "states" in batch:
            x = batch["states"]
            for block in self.encoder.layers[self.frozen:]:
                x = block(x, mask)
            return x, mask
        return self.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                            layers=self.n_shared), mask

    def branch(self, j, x, mask):
        for block in self.branches[j]:
            x = block(x, mask)
        return x

    def mixture(self, x, mask, branches, weights):
        """sum_j weights[:, j] * Branch_{branches[j]}(x'): weights (B, len(branches)) are convex per example."""
        return sum(weights[:, n, None, None] * self.branch(j, x, mask) for n, j in enumerate(branches))

    def hidden(self, batch, lang):
        """Top token states for inference: own branch for a supervised language, else the uniform mixture."""
        x, mask = self.bottom(batch)
        j = self.route(lang)
        if j is not None:
            return self.branch(j, x, mask)
        K = len(self.branches)
        return self.mixture(x, mask, range(K), mixture_weights(x.shape[0], K, "uniform", x.device))

    def forward(self, batch, lang):
        return self.head(self.hidden(batch, lang), batch["attention_mask"])

    def as_encoder(self, j):
        """Branch j as a standalone Encoder (shared bottom + branch j's blocks, the modules themselves)."""
        with torch.device("meta"):     # no memory or random init for modules that are replaced right away
            enc = Encoder(self.config)
        enc.embed = self.encoder.embed
        enc.layers = nn.ModuleList(list(self.encoder.layers) + list(self.branches[j]))
        return enc

    def compile_blocks(self):
        """torch.compile every transformer block (shapes vary with the batch's length: dynamic)."""
        for block in list(self.encoder.layers) + [b for br in self.branches for b in br]:
            block.compile(dynamic=True)


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
    """One Hugging Face-layout classifier per branch, out_dir/<lang> (shared bottom + that branch + the
    head: `evaluate.py --model out_dir/<lang> --task sib200` evaluates it alone), plus mblm.json.
    `extra` goes into every config.json and mblm.json (e.g. the input prefix, "xlt_prefix")."""
    out_dir = Path(out_dir)
    names = m.langs or ["shared"]
    for j, name in enumerate(names):
        model.save_pretrained(m.as_encoder(j), out_dir / name, tokenizer=tok, head=m.head,
                              extra={"mblm": {"langs": m.langs, "branch": name}, **(extra or {})})
    evaluate.write_json(out_dir / "mblm.json", {"langs": m.langs, "branch_layers": len(m.branches[0]),
                                                "dirs": names, **(extra or {})})


def load_mblm(out_dir):
    """(MBLM, tokenizer) from save_mblm's output: the shared bottom and head from the first directory,
    branch j from the top blocks of directory j (whose bottom must equal the first one's)."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "mblm.json").read_text())
    except (OSError, ValueError) as e:
        raise model.CheckpointError(f"{out_dir / 'mblm.json'}: cannot be read ({e})") from None
    k, dirs = meta["branch_layers"], meta["dirs"]
    loaded = [model.load_with_head(out_dir / d)[:2] for d in dirs]
    L = loaded[0][0].config.num_hidden_layers
    tops = [enc.layers[L - k:] for enc, _ in loaded]
    bottom = {n: v for n, v in loaded[0][0].state_dict().items() if not n.startswith("layers.") or
              int(n.split(".")[1]) < L - k}
    for d, (enc, _) in zip(dirs[1:], loaded[1:]):
        sd = enc.state_dict()
        if any(not torch.equal(v, sd[n]) for n, v in bottom.items()):
            raise model.CheckpointError(f"{out_dir / d}: its shared bottom differs from {out_dir / dirs[0]}'s")
    head = loaded[0][1]
    m = MBLM(loaded[0][0], meta["langs"], k, head.num_labels, head.pooling)
    m.head = head
    for branch, top in zip(m.branches, tops):
        branch.load_state_dict(top.state_dict())
    return m, data.load_tokenizer(out_dir / dirs[0])


# ----------------------------------------------------------------------------------------------------
# 2. The objective
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# 3. Examples, cached frozen states, batches
# ----------------------------------------------------------------------------------------------------

def sib200_examples(tok, data_dir, lang, split, max_len, prefix="", limit=None):
    """data.encode'd SIB-200 rows with their 'label' (the first `limit` rows, if given)."""
    return data.encode_rows(tok, data.read_sib200(data_dir, lang, split)[:limit], max_len, prefix)


def collate(examples, pad_id, device):
    """data.pad_batch (+ 'label'), with cached 'states' padded to the batch length and 'teacher_logits'
    stacked, when the examples carry them."""
    batch = data.pad_batch(examples, pad_id)
    T = batch["input_ids"].shape[1]
    if "states" in examples[0]:
        batch["states"] = torch.stack([F.pad(e["states"], (0, 0, 0, T - len(e["states"]))) for e in examples])
    if "teacher_logits" in examples[0]:
        batch["teacher_logits"] = torch.stack([e["teacher_logits"] for e in examples])
    return data.to_device(batch, device)


@torch.no_grad()
def frozen_states(encoder, examples, n_blocks, pad_id, device, batch_size=64, desc="cache"):
    """Store in each example the output of the encoder's first n_blocks blocks ('states', (T, H) float32
    on the CPU, no padding). The frozen blocks never change, so this runs once per model and dataset."""
    if n_blocks == 0:
        return
    device = torch.device(device)
    encoder.eval()
    for idx in tqdm(evaluate.length_batches(examples, batch_size), desc=desc, leave=False):
        batch = collate([examples[i] for i in idx], pad_id, device)
        with model.autocast(device):
            h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], layers=n_blocks)
        h = h.float().cpu()
        for row, i in enumerate(idx):
            examples[i]["states"] = h[row, :len(examples[i]["input_ids"])].clone()


@torch.no_grad()
def predict(m, examples, lang, pad_id, device, batch_size=64):
    """(logits (N, C) float32 on the CPU, in the examples' order) of model m routed for `lang`."""
    device, was = torch.device(device), m.training
    m.eval()
    out = torch.zeros(len(examples), m.head.num_labels)
    for idx in evaluate.length_batches(examples, batch_size):
        batch = collate([examples[i] for i in idx], pad_id, device)
        with model.autocast(device):
            out[idx] = m(batch, lang).float().cpu()
    m.train(was)
    return out


def accuracies(m, sets, pad_id, device, batch_size=64):
    """{lang: accuracy in percent} of m on sets = {lang: examples}, each routed by its language."""
    return {lang: evaluate.accuracy(predict(m, ex, lang, pad_id, device, batch_size).argmax(-1).tolist(),
                                    [e["label"] for e in ex]) for lang, ex in sets.items()}


def language_batches(train_sets, batch_size, seed, epoch):
    """[(lang, index batch)]: every language's examples in length-bucketed batches of that language
    alone (one branch per batch), the languages' batches interleaved at random."""
    out = [(lang, idx) for n, (lang, ex) in enumerate(train_sets.items())
           for idx in data.bucket_batches([len(e["input_ids"]) for e in ex], batch_size, seed + 1000 * n, epoch)]
    return [out[i] for i in np.random.default_rng([seed, epoch, 7]).permutation(len(out))]


# ----------------------------------------------------------------------------------------------------
# 4. The training loop (teachers and students alike)
# ----------------------------------------------------------------------------------------------------

def train(m, train_sets, dev_sets, args, device, pad_id, alpha=0.0, zs_weight=0.0, epochs=None, desc="train"):
    """Fine-tune m on train_sets = {lang: examples}; after every epoch, the mean dev accuracy over dev_sets'
    languages selects the best epoch, whose trainable weights m ends with. Returns the dev history."""
    epochs = args.epochs if epochs is None else epochs
    freeze(m, args.train_embeddings)
    m.to(device).train()
    if args.compile:
        m.compile_blocks()
    # The head learns at --head_lr, the transformer blocks at --lr (see the docstring: e5's sentence
    # vectors are nearly parallel, and a fresh head at the blocks' rate needs many epochs to split them).
    opt = model.configure_optimizer([m.encoder, m.branches], args.lr, args.weight_decay)
    for group in model.configure_optimizer([m.head], args.head_lr, args.weight_decay).param_groups:
        opt.add_param_group(group)
    for group in opt.param_groups:
        group["peak_lr"] = group["lr"]
    params = [p for p in m.parameters() if p.requires_grad]
    # Every epoch's batches, made once: their count is also the length of the learning-rate schedule.
    schedule = [language_batches(train_sets, args.batch_size, args.seed, e) for e in range(epochs)]
    total = sum(len(batches) for batches in schedule)
    warmup = math.ceil(args.warmup * total)
    history, best, best_state = [], -1.0, None
    running, count, step = torch.zeros((), device=device), 0, 0
    bar = tqdm(total=total, desc=desc, leave=False)
    for epoch, batches in enumerate(schedule):
        for lang, idx in batches:
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * model.lr_schedule(step, total, warmup)
            batch = collate([train_sets[lang][i] for i in idx], pad_id, device)
            with model.autocast(device):
                loss = mblm_loss(m, batch, lang, alpha, args.temperature, zs_weight, args.mixture)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            running += loss.detach()           # no .item() here: the step never waits for the device
            count += 1
            step += 1
            bar.update(1)
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{(running / count).item():.3f}")
                running.zero_()
                count = 0
        dev = accuracies(m, dev_sets, pad_id, device, args.eval_batch_size)
        mean = sum(dev.values()) / len(dev)
        history.append({"epoch": epoch + 1, "dev": {k: round(v, 2) for k, v in dev.items()}, "dev_mean": round(mean, 2)})
        tqdm.write(f"[{desc}] epoch {epoch + 1}/{epochs}: dev " + ", ".join(f"{k} {v:.1f}" for k, v in dev.items()))
        if mean > best:   # only trainable tensors change: keep those
            best = mean
            best_state = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    bar.close()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in best_state:
                p.copy_(best_state[n])
    return history


# ----------------------------------------------------------------------------------------------------
# 5. Teachers
# ----------------------------------------------------------------------------------------------------

def parse_teachers(arg):
    """'eng_Latn=NAME,fra_Latn=DIR' -> {lang: name}, in order."""
    out = {}
    for item in arg.split(","):
        lang, sep, name = item.strip().partition("=")
        if not sep or not lang.strip() or not name.strip():
            raise XltError(f"--teachers: expected LANG=NAME_OR_DIR items separated by commas, got {item!r}")
        if lang.strip() in out:
            raise XltError(f"--teachers: language {lang.strip()} is given twice")
        out[lang.strip()] = name.strip()
    if not out:
        raise XltError("--teachers is empty")
    return out


def has_head(name):
    """Whether a checkpoint is an xlt fine-tuned classifier (a directory whose config.json has xlt_head)."""
    path = model.resolve_checkpoint(name)
    return path.is_dir() and "xlt_head" in json.loads((path / "config.json").read_text())


# ----------------------------------------------------------------------------------------------------
# 6. The experiment
# ----------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(formatter_class=model.HelpFormatter, description="MBLM (Yang et al. 2022): a multi-branch multilingual student "
                                "distilled from monolingual teachers, with zero-shot-aware training, on SIB-200.")
    p.add_argument("--teachers", default=DEFAULT_TEACHERS, help="LANG=NAME_OR_DIR,... one teacher per supervised "
                   "language; a directory with an xlt classification head is used as is, any other checkpoint "
                   f"is fine-tuned on LANG's SIB-200 train split first (default: {DEFAULT_TEACHERS}; the German "
                   "one is a multilingual stand-in, see the docstring)")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="the multilingual checkpoint the student starts from")
    p.add_argument("--langs", default=None, help="comma-separated SIB-200 test languages (default: "
                   "evaluate.DEFAULT_SIB200_LANGS plus the supervised ones); those without a teacher are zero-shot")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)} to train")
    p.add_argument("--branch_layers", type=int, default=2, help="k: blocks per language branch (copies of the "
                   "student's top k blocks)")
    p.add_argument("--train_layers", type=int, default=4, help="fine-tune only the top N blocks of every model "
                   "(>= --branch_layers); the blocks below are frozen and their outputs cached (CPU budget). "
                   "The number of blocks of a model, or more, fine-tunes all of it")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) term in ell")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--zs_weight", type=float, default=1.0, help="lambda: weight of the zero-shot-aware term")
    p.add_argument("--mixture", default="uniform", choices=["uniform", "random"], help="training mixture weights "
                   "of the other branches: uniform, or random (uniform on the simplex, per example)")
    p.add_argument("--epochs", type=int, default=3, help="student epochs (over all supervised languages)")
    p.add_argument("--teacher_epochs", type=int, default=3, help="epochs for teachers that need fine-tuning")
    p.add_argument("--batch_size", type=int, default=32, help="sentences per step")
    p.add_argument("--eval_batch_size", type=int, default=64, help="sentences per evaluation batch")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the transformer blocks")
    p.add_argument("--head_lr", type=float, default=3e-3, help="peak learning rate of the classifier head")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's, on matrices only")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup")
    p.add_argument("--max_len", type=int, default=128, help="subword tokens per input")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows of every split (tests)")
    p.add_argument("--train_embeddings", action="store_true", help="also train the word-embedding matrix "
                   "(only with --train_layers covering the whole model)")
    p.add_argument("--log_every", type=int, default=10, help="steps between logged losses")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python's random")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--data_dir", default=None, help="data folder (default: $XLT_DATA, else ~/.cache/xlt/data)")
    p.add_argument("--out_dir", default="out/mblm", help="results.json, teachers and the MBLM branches")
    args = p.parse_args(argv)
    for name in ("branch_layers", "train_layers", "epochs", "teacher_epochs", "batch_size", "eval_batch_size",
                 "max_len", "log_every"):
        if getattr(args, name) < 1:
            raise XltError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.train_layers < args.branch_layers:
        raise XltError(f"--train_layers ({args.train_layers}) must be >= --branch_layers ({args.branch_layers}): "
                       "the branches are always trained")
    if not 0 <= args.alpha <= 1:
        raise XltError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.temperature <= 0 or args.zs_weight < 0:
        raise XltError("--temperature must be > 0 and --zs_weight >= 0")
    if args.limit is not None and args.limit < 2:
        raise XltError(f"--limit must be >= 2, got {args.limit}")
    return args


class Model:
    """A checkpoint loaded once: its pristine encoder, tokenizer, prefix, and cached examples."""

    def __init__(self, name, args, data_dir, device):
        self.name, self.args, self.data_dir, self.device = name, args, data_dir, device
        self.encoder = Encoder.from_pretrained(name)
        self.tok = data.load_tokenizer(name)
        self.pad_id = data.special_ids(self.tok)["pad"]
        self.prefix = evaluate.resolve_prefix("auto", name)
        L = self.encoder.config.num_hidden_layers
        self.frozen = max(0, L - args.train_layers)
        if args.branch_layers > L:
            raise XltError(f"--branch_layers {args.branch_layers}: {name} has only {L} blocks")
        self._sets = {}

    def examples(self, lang, split):
        """SIB-200 examples of (lang, split) with their frozen states, computed once."""
        if (lang, split) not in self._sets:
            ex = sib200_examples(self.tok, self.data_dir, lang, split, self.args.max_len, self.prefix, self.args.limit)
            self.encoder.to(self.device)
            frozen_states(self.encoder, ex, self.frozen, self.pad_id, self.device, self.args.eval_batch_size,
                          desc=f"frozen blocks {lang} {split}")
            self._sets[(lang, split)] = ex
        return self._sets[(lang, split)]

    def fresh(self, langs):
        """A new MBLM from a copy of the pristine encoder (branches for langs, or one shared top)."""
        return MBLM(copy.deepcopy(self.encoder), langs, self.args.branch_layers, len(data.SIB200_LABELS),
                    frozen=self.frozen)


def make_teacher(lang, name, args, data_dir, device, loaded):
    """(teacher logits on lang's train split (N, C), info dict): a fine-tuned classifier as is, else fine-tune
    `name` on lang's SIB-200 train split first (model selection on its dev split)."""
    t0 = time.time()
    if has_head(name):
        enc, head, _ = model.load_with_head(name)
        if head.describe() != {"type": "sequence", "pooling": head.pooling, "num_labels": len(data.SIB200_LABELS)}:
            raise XltError(f"--teachers {lang}={name}: its head is not a {len(data.SIB200_LABELS)}-way sequence classifier")
        tok = data.load_tokenizer(name)
        m = MBLM(enc, None, 1, head.num_labels, head.pooling)
        m.head = head
        m.to(device)
        pad_id, prefix = data.special_ids(tok)["pad"], evaluate.resolve_prefix("auto", name)
        ex = sib200_examples(tok, data_dir, lang, "train", args.max_len, prefix, args.limit)
        test = {lang: sib200_examples(tok, data_dir, lang, "test", args.max_len, prefix, args.limit)}
        info = {"checkpoint": name, "fine_tuned_here": False}
    else:
        if name not in loaded:
            loaded[name] = Model(name, args, data_dir, device)
        src = loaded[name]
        model.set_seed(args.seed)
        m = src.fresh(None)
        ex, pad_id = src.examples(lang, "train"), src.pad_id
        history = train(m, {lang: ex}, {lang: src.examples(lang, "dev")}, args, device, pad_id,
                        epochs=args.teacher_epochs, desc=f"teacher {lang}")
        test = {lang: src.examples(lang, "test")}
        info = {"checkpoint": name, "fine_tuned_here": True, "history": history}
    logits = predict(m, ex, lang, pad_id, device, args.eval_batch_size)
    info["train_accuracy"] = evaluate.accuracy(logits.argmax(-1).tolist(), [e["label"] for e in ex])
    info["test_accuracy"] = accuracies(m, test, pad_id, device, args.eval_batch_size)[lang]
    info["seconds"] = round(time.time() - t0, 1)
    return logits, info


def summary_table(results, supervised):
    """Markdown: per variant, each supervised language, their mean, and the zero-shot mean."""
    lines = ["| method | " + " | ".join(supervised) + " | supervised avg | zero-shot avg |",
             "|---|" + "---:|" * (len(supervised) + 2)]
    for name, r in results.items():
        cells = [r["scores"][lang] for lang in supervised] + [r["supervised_avg"], r["zero_shot_avg"]]
        lines.append(f"| {LABELS[name]} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    t0 = time.time()
    args = get_args(argv)
    device = model.pick_device(args.device)
    data_dir = data.resolve_data_dir(args.data_dir)
    teachers = parse_teachers(args.teachers)
    supervised = list(teachers)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise XltError(f"--variants: unknown {', '.join(bad) or '(empty)'} (choose from {', '.join(VARIANTS)})")
    if len(supervised) < 2 and any(VARIANTS[v][2] for v in variants):
        raise XltError("the zero-shot-aware term (variant mblm) needs at least two supervised languages in --teachers")
    have = set(data.sib200_languages(data_dir))
    langs = ([x.strip() for x in args.langs.split(",") if x.strip()] if args.langs
             else supervised + [x for x in evaluate.DEFAULT_SIB200_LANGS if x not in supervised])
    missing = [x for x in supervised + langs if x not in have]
    if missing:
        raise XltError(f"--teachers/--langs: SIB-200 has no language {', '.join(missing)} (codes like eng_Latn)")
    zero_shot = [x for x in langs if x not in supervised]
    out_dir = Path(args.out_dir)
    print(f"[mblm] device {device}; student {args.student}; supervised {', '.join(supervised)}; "
          f"zero-shot {len(zero_shot)} languages")
    for lang, name in teachers.items():
        role = "fine-tuned classifier, used as is" if has_head(name) else "fine-tuned here on its language"
        note = (" -- a STAND-IN for a monolingual teacher: it is the student's own multilingual checkpoint"
                if name == args.student else "")
        print(f"[mblm] teacher {lang}: {name} ({role}){note}")

    # Teachers: soft targets on their language's train split, computed once.
    loaded = {}
    teacher_logits, teacher_info = {}, {}
    for lang, name in teachers.items():
        teacher_logits[lang], teacher_info[lang] = make_teacher(lang, name, args, data_dir, device, loaded)
        print(f"[mblm] teacher {lang}: test accuracy {teacher_info[lang]['test_accuracy']:.1f} "
              f"({teacher_info[lang]['seconds']:.0f} s)")
    if args.student not in loaded:
        loaded[args.student] = Model(args.student, args, data_dir, device)
    student = loaded[args.student]
    for other in [n for n in loaded if n != args.student]:   # free teachers we no longer need
        del loaded[other]
    train_sets = {}
    for lang in supervised:
        ex = student.examples(lang, "train")
        if len(ex) != len(teacher_logits[lang]):
            raise XltError(f"{lang}: teacher and student read different numbers of train rows")
        train_sets[lang] = [dict(e, teacher_logits=t) for e, t in zip(ex, teacher_logits[lang])]
    dev_sets = {lang: student.examples(lang, "dev") for lang in supervised}
    test_sets = {lang: student.examples(lang, "test") for lang in langs}

    results = {}
    for name in variants:
        branches, distil, zs = VARIANTS[name]
        tv = time.time()
        model.set_seed(args.seed)
        m = student.fresh(supervised if branches else None)
        history = train(m, train_sets, dev_sets, args, device, student.pad_id, alpha=args.alpha if distil else 0.0,
                        zs_weight=args.zs_weight if zs else 0.0, desc=name)
        scores = accuracies(m, test_sets, student.pad_id, device, args.eval_batch_size)
        results[name] = {"scores": scores, "supervised_avg": sum(scores[x] for x in supervised) / len(supervised),
                         "zero_shot_avg": sum(scores[x] for x in zero_shot) / len(zero_shot) if zero_shot else None,
                         "history": history, "seconds": round(time.time() - tv, 1)}
        zs_avg = results[name]["zero_shot_avg"]     # None without zero-shot languages (0.0 is a score)
        print(f"[mblm] {LABELS[name]}: supervised {results[name]['supervised_avg']:.1f}, zero-shot "
              f"{float('nan') if zs_avg is None else zs_avg:.1f} ({results[name]['seconds']:.0f} s)")
        if name == ("mblm" if "mblm" in variants else variants[-1]):
            save_mblm(m.cpu(), out_dir / name, student.tok, extra={"variant": name, "xlt_prefix": student.prefix})
        del m

    table = summary_table(results, supervised)
    per_lang = evaluate.markdown_table({LABELS[n]: r["scores"] for n, r in results.items()})
    seconds = round(time.time() - t0, 1)
    print("\nSIB-200 test accuracy (supervised languages through their branch, the others zero-shot):\n" + table)
    print("\nper language:\n" + per_lang)
    print(f"\n[mblm] {seconds:.0f} s; wrote {out_dir / 'results.json'}")
    evaluate.write_json(out_dir / "results.json", {
        "config": vars(args), "device": str(device), "hardware": model.hardware(device),
        "supervised": supervised, "zero_shot": zero_shot,
        "teachers": teacher_info,
        "results": {n: dict(r, scores={k: round(v, 2) for k, v in r["scores"].items()}) for n, r in results.items()},
        "table": table, "seconds": seconds})
    return results


if __name__ == "__main__":
    try:
        main()
    except XltError as e:
        sys.exit(f"error: {e}")
