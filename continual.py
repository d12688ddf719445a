"""continual.py: fine-tune on English POS tagging while keeping the cross-lingual ability of pre-training,
by treating masked-LM pre-training as an earlier task of continual learning.

Paper: Zihan Liu, Genta Indra Winata, Andrea Madotto, Pascale Fung (2020), "Exploring Fine-tuning
Techniques for Pre-trained Cross-lingual Models via Continual Learning" (arXiv:2004.14218).

What the paper says (its abstract; we could not read the full text): fine-tuning a multilingual model on an
English task changes its parameters and weakens its cross-lingual ability, measured by cross-lingual
sentence retrieval; preserving the pre-trained model's ability with continual learning keeps retrieval
better and gives better zero-shot POS tagging and NER than other fine-tuning baselines.

The method in five lines (our reconstruction, from the abstract and the issue that asked for this script):
  1. The "previous task" is the model's pre-training task, masked-LM, replayed on a small episodic memory
     of multilingual text (here 100 SIB-200 *training* sentences in each of 20 languages).
  2. At every step take the task gradient g (English POS tagging) and the MLM gradient g_ref on a memory batch.
  3. If they conflict (g . g_ref < 0), project g onto the half-space where the MLM loss does not increase:
         g <- g - (g . g_ref / g_ref . g_ref) g_ref
     This is GEM (Lopez-Paz & Ranzato 2017) with a single previous task: its quadratic program (the
     closest g~ to g with g~ . g_ref >= 0) has exactly this closed form, which is also A-GEM's update
     (Chaudhry et al. 2019), so "GEM" and "A-GEM" coincide here.
  4. The projection acts on the *shared encoder parameters* only: every trainable encoder parameter below the
     heads (position and token-type embeddings, the embedding LayerNorm, all Transformer blocks; with
     --train_embeddings also the word-embedding matrix). The POS head is not shared with MLM, so its
     gradient is left as it is; the MLM head is frozen.
  5. Compared with (--method): naive fine-tuning; freezing the embeddings and the bottom k blocks;
     multi-task learning (loss = POS + lambda * MLM on the memory); and gem (the projection above).

Measured as the paper does (our concrete choices of data):
  - cross-lingual ability: Tatoeba xx->en top-1 retrieval (mean-pooled sentence vectors, cosine) at every
    hidden state, before fine-tuning and after each method;
  - zero-shot POS: train on UD English-EWT, select on EWT dev, test on the parallel UD PUD test sets.

Our choices (not the paper's):
  - multilingual-e5-small ships without an MLM head (e5 was trained contrastively after its MLM-style
    distillation). So a step the paper does not have comes first: we fit a fresh head (dense + GELU +
    LayerNorm + output bias; the decoder is the frozen word-embedding matrix, tied) on the *frozen* encoder
    with MLM on the memory (500 steps of 64 masked tokens on stored last-layer states), print its final
    loss/accuracy, and cache it under --out_dir keyed by checkpoint name, steps and memory (`fit_mlm_head`).
    This head is weak (measured: 15.7% masked-token accuracy on the memory, 5.8% on held-out SIB-200 dev
    sentences: e5's last layer was not trained to predict tokens, and ten thousand targets are little data),
    so g_ref here means "do not move the representations in directions that hurt this head's token
    predictions". A checkpoint with an MLM head (mBERT, XLM-R) uses its own.
  - The MLM softmax runs over the ids that occur in the memory (and the held-out MLM text), ~20k, not all
    250k ids (--mlm_vocab memory): on a CPU the full decoder costs more than the encoder. Every target is
    in that set, so this only drops never-seen ids from the normaliser. --mlm_vocab full is exact.
  - The word-embedding matrix is frozen by default (xlt's convention: the 250k-row matrix dominates a CPU
    optimizer step, and rows of languages absent from English POS data should not drift); --train_embeddings.
  - freeze: the embeddings and the bottom --freeze_layers 6 of 12 blocks. multitask: lambda = 1.
  - Budget for a 2-core CPU: 2,000 of EWT's 12,544 training sentences (--train_sentences, a seeded random
    subset), 1 epoch of 125 steps of 16 sentences at lr 1e-4 (small encoders take a larger lr than BERT-base),
    model selection every 50 steps on 300 EWT dev sentences, the first 200 PUD sentences per language (the
    same 200 sentences in every language: PUD is parallel), the first 200 Tatoeba pairs per language
    (--tatoeba_limit), and 8 languages that have both Tatoeba and PUD sets. Retrieval among 200 candidates
    is easier than among 1,000, so the numbers are higher than full-Tatoeba ones; what they are for is the
    comparison between methods. Memory batches have 8 sentences (half the task batch, to save time).
  - e5 is used with its "query: " prefix for retrieval (evaluate.resolve_prefix), nothing for POS.

Run:
    XLT_DATA=../shared/data python continual.py --method all   # e5-small: 18.5 min on ONE core of a 2-core CPU
    python continual.py --method gem --checkpoint xlm-roberta-base --train_sentences 12544 --epochs 3 \
        --tatoeba_limit 1000 --pud_sentences 1000 --mlm_vocab full --device cuda   # with internet + a GPU
"""
import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate
import model
from model import XltError

METHODS = ("naive", "freeze", "multitask", "gem")

# Languages with both a Tatoeba set (retrieval) and a UD PUD test set (POS):
# Tatoeba code (ISO 639-3) -> (PUD code (ISO 639-1), FLORES-200 code of SIB-200 for the memory).
LANGS = {"deu": ("de", "deu_Latn"), "fra": ("fr", "fra_Latn"), "spa": ("es", "spa_Latn"),
         "ita": ("it", "ita_Latn"), "por": ("pt", "por_Latn"), "rus": ("ru", "rus_Cyrl"),
         "cmn": ("zh", "zho_Hans"), "jpn": ("ja", "jpn_Jpan"), "kor": ("ko", "kor_Hang"),
         "ara": ("ar", "arb_Arab"), "hin": ("hi", "hin_Deva"), "tur": ("tr", "tur_Latn"),
         "ind": ("id", "ind_Latn"), "tha": ("th", "tha_Thai"), "fin": ("fi", "fin_Latn"),
         "pol": ("pl", "pol_Latn"), "swe": ("sv", "swe_Latn"), "ces": ("cs", "ces_Latn"),
         "isl": ("is", "isl_Latn")}
# Eight scripts/families: Germanic, Romance, Slavic/Cyrillic, Han, Japanese, Arabic, Devanagari, Turkic.
DEFAULT_LANGS = ["deu", "fra", "rus", "cmn", "jpn", "ara", "hin", "tur"]
DEFAULT_MEMORY_LANGS = ["eng_Latn"] + [flores for _, flores in LANGS.values()]


# ----------------------------------------------------------------------------------------------------
# The projection (GEM with one previous task = A-GEM), written on flat vectors
# ----------------------------------------------------------------------------------------------------

def flatten_grads(params):
    """The gradients of a parameter group as one fp32 vector (a parameter without a gradient counts as 0)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


def write_grads(params, flat):
    """Scatter a flat vector back into the .grad of each parameter of the group (the inverse of flatten_grads).
    The gradients become views of `flat` (no copy of every shared gradient per step), so pass a fresh vector."""
    sizes = [p.numel() for p in params]
    if sum(sizes) != flat.numel():
        raise ValueError(f"write_grads: the vector has {flat.numel()} entries, the parameters {sum(sizes)}")
    for p, g in zip(params, flat.split(sizes)):
        p.grad = g.view_as(p).to(p.dtype)


def project(g, g_ref):
    """GEM's update with one previous task: g itself if g . g_ref >= 0 (the step does not increase the
    previous task's loss to first order), else g - (g . g_ref / g_ref . g_ref) g_ref, the closest vector
    to g with a non-negative dot product with g_ref. Dot products in fp32. torch.where instead of an `if`
    keeps the step free of host syncs. Returns (projected g, whether it was projected: a 0-d bool tensor)."""
    g32, r32 = g.float(), g_ref.float()
    dot = torch.dot(g32, r32)
    conflict = dot < 0
    coef = torch.where(conflict, dot / torch.dot(r32, r32).clamp_min(1e-20), torch.zeros_like(dot))
    return (g32 - coef * r32).to(g.dtype), conflict


def gem_backward(task_loss, memory_loss, shared):
    """The backward pass of one GEM step. (1) task_loss.backward(): every trainable parameter gets the task
    gradient, the task head included. (2) Set the shared parameters' g aside and clear them. (3) g_ref: the
    previous task's loss on a memory batch (memory_loss() builds it), backward; it reaches only shared
    parameters, since the MLM head is frozen and the task head is not in its graph. (4) Write the projection
    of g against g_ref into the shared parameters' .grad. Returns (memory loss, projected?, cos(g, g_ref))."""
    task_loss.backward()
    g = flatten_grads(shared)
    for p in shared:
        p.grad = None
    ref = memory_loss()
    ref.backward()
    g_ref = flatten_grads(shared)
    cos = F.cosine_similarity(g, g_ref, dim=0)          # how much the two tasks conflict (logged)
    g, conflict = project(g, g_ref)
    write_grads(shared, g)
    return ref, conflict, cos


def shared_parameters(enc):
    """(names, params) of the shared encoder parameters: every trainable encoder parameter outside the
    MLM head. The task head is a separate module, so it is never in this list."""
    named = [(n, p) for n, p in enc.named_parameters() if p.requires_grad and not n.startswith("mlm.")]
    return [n for n, _ in named], [p for _, p in named]


def set_trainable(enc, method, freeze_layers=6, train_embeddings=False):
    """requires_grad for one method. Always frozen: the MLM head (the previous task's head, fitted once).
    The word-embedding matrix unless train_embeddings. freeze: all embeddings + the bottom freeze_layers blocks."""
    for p in enc.parameters():
        p.requires_grad_(True)
    if enc.mlm is not None:
        enc.mlm.requires_grad_(False)
    enc.embed.word.weight.requires_grad_(train_embeddings)
    if method == "freeze":
        if not 0 <= freeze_layers <= len(enc.layers):
            raise XltError(f"--freeze_layers must be between 0 and {len(enc.layers)}, got {freeze_layers}")
        enc.embed.requires_grad_(False)
        for block in enc.layers[:freeze_layers]:
            block.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# The previous task: masked LM on a memory of multilingual text
# ----------------------------------------------------------------------------------------------------

def mlm_vocab(example_lists, tok, vocab_size, full=False):
    """The ids the MLM softmax runs over: every id (full), or the non-special ids that occur in the given
    encoded texts (the memory, and the held-out text that measures MLM), as a sorted LongTensor."""
    if full:
        return torch.arange(vocab_size)
    specials = set(data.special_ids(tok).values())
    return torch.tensor(sorted({i for examples in example_lists for e in examples for i in e["input_ids"]}
                               - specials), dtype=torch.long)


class Memory:
    """The episodic memory: encoded multilingual sentences, served as masked-LM batches.

    A batch is built on the CPU: data.mask_tokens (BERT's 80/10/10), then the flat positions of the masked
    tokens and their targets as rows of `vocab`. Doing this indexing here, not on the device, keeps the
    training step free of host syncs (a boolean mask on the device would need one to know its size)."""

    def __init__(self, examples, vocab, tok, vocab_size, batch_size, prob, seed):
        self.examples, self.vocab, self.batch_size, self.prob = examples, vocab, batch_size, prob
        sp = data.special_ids(tok)
        self.pad, self.mask, self.specials, self.vocab_size = sp["pad"], sp["mask"], sorted(set(sp.values())), vocab_size
        self.row = torch.full((vocab_size,), -1, dtype=torch.long)     # token id -> its row of vocab
        self.row[vocab] = torch.arange(len(vocab))
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, rows=None):
        """A masked batch of the given example indices, or of batch_size random ones."""
        if rows is None:
            rows = torch.randint(len(self.examples), (self.batch_size,), generator=self.generator).tolist()
        b = data.pad_batch([self.examples[i] for i in rows], self.pad)
        masked, labels = data.mask_tokens(b["input_ids"], b["attention_mask"], self.specials, self.mask,
                                          self.vocab_size, self.generator, self.prob)
        if not labels.ne(-100).any():       # nothing drawn (very short sentences): mask the first real token
            labels[0, 1], masked[0, 1] = b["input_ids"][0, 1], self.mask
        positions = labels.view(-1).ne(-100).nonzero().squeeze(1)
        targets = self.row[labels.view(-1)[positions]]
        if (targets < 0).any():
            raise XltError("memory batch: a masked token is outside the MLM vocabulary (build it with mlm_vocab "
                           "over every text that is masked)")
        return {"input_ids": masked, "attention_mask": b["attention_mask"], "token_type_ids": b["token_type_ids"],
                "positions": positions, "targets": targets}


def mlm_loss(enc, batch, vocab, forward=None):
    """(cross-entropy, number of correct predictions) of the memory batch's masked tokens."""
    h = (forward or enc)(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    logits = enc.mlm_logits(h.flatten(0, 1)[batch["positions"]], vocab).float()   # softmax over `vocab` only
    return F.cross_entropy(logits, batch["targets"]), (logits.argmax(-1) == batch["targets"]).sum()


def read_memory(data_dir, langs, per_lang, split="train"):
    """The first per_lang SIB-200 sentences of each language of a split (train for the memory, dev for
    measuring MLM; never test). Topic labels are not used: the memory is plain text."""
    return [row["text"] for lang in langs for row in data.read_sib200(data_dir, lang, split)[:per_lang]]


def mlm_head_cache(out_dir, args):
    """Where the fitted MLM head is cached: keyed by checkpoint name and steps, plus a short hash of
    everything else that determines the head (the memory and the fitting's settings)."""
    key = {k: getattr(args, k) for k in ("checkpoint", "mlm_head_steps", "mlm_head_lr", "memory_langs",
                                         "memory_per_lang", "memory_eval_per_lang", "max_len", "mlm_prob",
                                         "mlm_vocab", "seed")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(args.checkpoint)).strip("_")
    return Path(out_dir) / "mlm_head" / f"{name}-{args.mlm_head_steps}steps-{digest}.safetensors"


def fit_mlm_head(enc, memory, steps, lr, device, cache, batch_tokens=64, log_every=100):
    """Fit a freshly initialised MLM head (dense, LayerNorm, output bias; the decoder is the frozen word-
    embedding matrix) with masked LM on the memory, the encoder frozen; or load it from `cache`.

    The encoder does not change here, so it runs once over the memory (every sentence masked once) and the
    head is fitted for `steps` steps of `batch_tokens` masked tokens on the stored last-layer states: the
    same objective as running the encoder at every step, for a fraction of the cost.
    Returns {'cache', 'loaded', 'steps', 'targets', 'loss', 'accuracy'} (the last 10% of steps)."""
    if cache.is_file():
        enc.mlm.load_state_dict(model.read_safetensors(cache))
        info = json.loads(cache.with_suffix(".json").read_text()) if cache.with_suffix(".json").is_file() else {}
        print(f"[continual] MLM head: loaded the fitted head from {cache} "
              f"(final loss {info.get('loss', float('nan')):.3f}, accuracy {info.get('accuracy', float('nan')):.1f}%)")
        return {**info, "cache": str(cache), "loaded": True}
    enc.requires_grad_(False)
    states, targets, was_training = [], [], enc.training
    enc.eval()                                            # a fixed feature extractor: no dropout
    with torch.no_grad():
        for i in tqdm(range(0, len(memory.examples), 32), desc="MLM head: encode memory", leave=False):
            batch = data.to_device(memory.batch(list(range(i, min(i + 32, len(memory.examples))))), device)
            with model.autocast(device):
                h = enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            states.append(h.flatten(0, 1)[batch["positions"]].float())
            targets.append(batch["targets"])
    enc.train(was_training)
    states, targets = torch.cat(states), torch.cat(targets)
    print(f"[continual] MLM head: the checkpoint has none; fitting one on the frozen encoder: {steps} steps of "
          f"{batch_tokens} masked tokens from {len(targets)} (memory: {len(memory.examples)} sentences), "
          f"softmax over {len(memory.vocab)} ids")
    enc.mlm.requires_grad_(True)
    opt = model.configure_optimizer([enc.mlm], lr, 0.0)
    vocab = memory.vocab.to(device)
    tail = max(1, steps // 10)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    # Every step's token indices drawn up front and moved once: a CPU tensor moved to a GPU inside the loop
    # would wait for the queued work at every step (the same numbers as drawing 64 per step).
    draws = torch.randint(len(targets), (steps, batch_tokens), generator=memory.generator).to(device)
    for step in tqdm(range(steps), desc="MLM head: fit", leave=False):
        for group in opt.param_groups:
            group["lr"] = lr * model.lr_schedule(step, steps, max(1, steps // 10))
        idx = draws[step]
        with model.autocast(device):
            logits = enc.mlm_logits(states[idx], vocab).float()
        loss = F.cross_entropy(logits, targets[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= steps - tail:
            loss_sum += loss.detach()
            correct += (logits.argmax(-1) == targets[idx]).sum()
        if (step + 1) % log_every == 0:
            tqdm.write(f"[continual] MLM head step {step + 1}/{steps}: loss {loss.item():.3f}")
    enc.requires_grad_(False)
    info = {"steps": steps, "targets": len(targets), "loss": loss_sum.item() / tail,
            "accuracy": 100.0 * correct.item() / (tail * batch_tokens)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    model.write_safetensors(enc.mlm.state_dict(), cache)     # atomic: a cut-off run leaves no half file
    evaluate.write_json(cache.with_suffix(".json"), info)
    print(f"[continual] MLM head: fitted, final masked-LM loss {info['loss']:.3f}, accuracy "
          f"{info['accuracy']:.1f}% (mean of the last {tail} steps, on the memory); cached at {cache}")
    return {**info, "cache": str(cache), "loaded": False}


def memory_mlm_score(enc, batches, vocab, device):
    """(loss, accuracy %) of masked LM over fixed held-out batches: how much of the previous task survives."""
    vocab = vocab.to(device)
    loss, correct, count, was_training = 0.0, 0, 0, enc.training
    enc.eval()
    with torch.no_grad():
        for batch in batches:
            batch = data.to_device(batch, device)
            with model.autocast(device):
                batch_loss, batch_correct = mlm_loss(enc, batch, vocab)
            n = len(batch["targets"])
            loss, correct, count = loss + batch_loss.item() * n, correct + batch_correct.item(), count + n
    enc.train(was_training)
    return loss / count, 100.0 * correct / count


# ----------------------------------------------------------------------------------------------------
# Evaluation on subsets (evaluate.py measures whole sets; these cut them for a CPU budget)
# ----------------------------------------------------------------------------------------------------

def retrieval_per_layer(enc, tok, tatoeba, device, prefix, batch_size=64):
    """{lang: [xx->en top-1 % at each hidden state, embeddings first]} on (foreign, english) lists."""
    out = {}
    for lang, (foreign, english) in tatoeba.items():
        x = evaluate.embed(enc, tok, foreign, device, batch_size, all_layers=True, prefix=prefix)
        e = evaluate.embed(enc, tok, english, device, batch_size, all_layers=True, prefix=prefix)
        out[lang] = [evaluate.retrieval_top1(x[i], e[i])[0] for i in range(len(x))]
    return out


def pos_eval(enc, head, tok, sets, device, batch_size=64):
    """{name: UPOS accuracy} for sets {name: [{'words', 'upos'}]}."""
    return {name: evaluate.pos_accuracy(enc, head, tok, sents, device, batch_size=batch_size)
            for name, sents in sets.items()}


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: one loop, four methods
# ----------------------------------------------------------------------------------------------------

def finetune(enc, head, method, train, dev, memory, tok, args, device):
    """Train enc + head on English POS with one method, keep the state with the best EWT-dev accuracy.
    Returns a dict of what happened: best dev accuracy, dev history, steps, and for gem the number of steps
    where g was projected and the mean cosine between g and g_ref."""
    set_trainable(enc, method, args.freeze_layers, args.train_embeddings)
    names, shared = shared_parameters(enc)
    trainable = [p for m in (enc, head) for p in m.parameters() if p.requires_grad]
    opt = model.configure_optimizer([enc, head], args.lr, args.weight_decay)
    forward = torch.compile(enc) if args.compile else enc
    vocab = memory.vocab.to(device)
    pad = data.special_ids(tok)["pad"]
    lengths = [len(e["input_ids"]) for e in train]
    per_epoch = math.ceil(len(train) / args.batch_size)
    total = per_epoch * args.epochs
    warmup = int(args.warmup * total)
    eval_every = args.eval_every or per_epoch
    zero = lambda: torch.zeros((), device=device)   # noqa: E731
    task_sum, mlm_sum, projected, cos_sum, since_log = zero(), zero(), zero(), zero(), 0   # per log window
    n_projected, cos_total = zero(), zero()                                                # whole run
    best, best_state, history = -1.0, None, []
    enc.train()
    head.train()
    pbar = tqdm(total=total, desc=method, leave=False)
    step = 0
    for epoch in range(args.epochs):
        for idx in data.bucket_batches(lengths, args.batch_size, args.seed, epoch):
            for group in opt.param_groups:
                group["lr"] = args.lr * model.lr_schedule(step, total, warmup)
            batch = data.to_device(data.pad_batch([train[i] for i in idx], pad), device)
            with model.autocast(device):
                h = forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                logits = head(h)
            task = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            loss = task
            if method == "multitask":                # one joint objective: POS + lambda * MLM (memory)
                with model.autocast(device):
                    mlm, _ = mlm_loss(enc, data.to_device(memory.batch(), device), vocab, forward)
                loss = task + args.mlm_weight * mlm
                mlm_sum += mlm.detach()
            if method == "gem":
                def memory_loss():
                    with model.autocast(device):
                        return mlm_loss(enc, data.to_device(memory.batch(), device), vocab, forward)[0]
                mlm, conflict, cos = gem_backward(loss, memory_loss, shared)
                n_projected += conflict
                projected += conflict
                cos_sum += cos
                mlm_sum += mlm.detach()
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            task_sum += task.detach()
            step += 1
            since_log += 1
            pbar.update(1)
            if step % args.log_every == 0 or step == total:
                msg = f"[{method}] step {step}/{total}: POS loss {task_sum.item() / since_log:.3f}"
                if method in ("multitask", "gem"):
                    msg += f", memory MLM loss {mlm_sum.item() / since_log:.3f}"
                if method == "gem":
                    msg += (f", cos(g, g_ref) {cos_sum.item() / since_log:+.3f}, projected "
                            f"{int(projected.item())}/{since_log} steps")
                    cos_total += cos_sum
                tqdm.write(msg)
                task_sum, mlm_sum, projected, cos_sum, since_log = zero(), zero(), zero(), zero(), 0
            if step % eval_every == 0 or step == total:
                acc = evaluate.pos_accuracy(enc, head, tok, dev, device, batch_size=args.eval_batch_size)
                history.append({"step": step, "dev": acc})
                tqdm.write(f"[{method}] step {step}: EWT dev UPOS accuracy {acc:.2f}")
                if acc > best:                       # keep a copy of what training changes
                    best = acc
                    best_state = [p.detach().clone() for p in trainable]
                enc.train()
                head.train()
    pbar.close()
    with torch.no_grad():
        for p, best_p in zip(trainable, best_state):
            p.copy_(best_p)
    enc.requires_grad_(False)
    return {"dev": best, "history": history, "steps": total,
            "projected_steps": int(n_projected.item()) if method == "gem" else None,
            "mean_cos_g_gref": cos_total.item() / total if method == "gem" else None,
            "shared_parameters": sum(p.numel() for p in shared), "shared_names": names}


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(formatter_class=model.HelpFormatter, description="Fine-tune on English POS without losing cross-lingual ability: "
                                "naive, freeze, multitask and GEM projection against masked LM (Liu et al. 2020).")
    p.add_argument("--method", default="all", choices=METHODS + ("all",),
                   help="naive | freeze | multitask | gem, or all (default) for the comparison table")
    p.add_argument("--checkpoint", default="intfloat/multilingual-e5-small", help="encoder (hub name or dir)")
    p.add_argument("--data_dir", default=None, help="data folder (default: $XLT_DATA, else ~/.cache/xlt/data)")
    p.add_argument("--out_dir", default="out/continual", help="results.json, the taggers and the fitted MLM head")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python's random")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder for training")
    p.add_argument("--langs", default=",".join(DEFAULT_LANGS),
                   help=f"Tatoeba codes, comma-separated, from: {','.join(LANGS)} (default: %(default)s); "
                        "each is evaluated on Tatoeba retrieval and on its UD PUD set")
    p.add_argument("--batch_size", type=int, default=16, help="POS sentences per step")
    p.add_argument("--eval_batch_size", type=int, default=64, help="sentences per evaluation batch")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of fine-tuning")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's, on matrices only")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup")
    p.add_argument("--epochs", type=int, default=1, help="passes over the EWT training subset")
    p.add_argument("--max_len", type=int, default=64, help="subword tokens per training / memory sentence")
    p.add_argument("--log_every", type=int, default=20, help="steps between logged losses")
    p.add_argument("--eval_every", type=int, default=50, help="steps between EWT-dev evaluations "
                   "(model selection; also after the last step); 0 = once per epoch")
    p.add_argument("--train_sentences", type=int, default=2000,
                   help="EWT training sentences, a seeded random subset of 12,544 (0 = all)")
    p.add_argument("--dev_sentences", type=int, default=300, help="EWT dev sentences for model selection "
                   "(seeded random subset of 2,001; 0 = all)")
    p.add_argument("--pud_sentences", type=int, default=200, help="first N sentences of each PUD test set "
                   "(the same sentences in every language; 0 = all 1,000)")
    p.add_argument("--tatoeba_limit", type=int, default=200, help="first N Tatoeba pairs per language (0 = all)")
    p.add_argument("--freeze_layers", type=int, default=6, help="freeze: bottom blocks frozen (with embeddings)")
    p.add_argument("--mlm_weight", type=float, default=1.0, help="multitask: lambda in POS + lambda * MLM")
    p.add_argument("--memory_langs", default=",".join(DEFAULT_MEMORY_LANGS),
                   help="SIB-200 languages (FLORES codes) of the memory (default: English + the 19 of LANGS)")
    p.add_argument("--memory_per_lang", type=int, default=100, help="memory sentences per language (SIB-200 train)")
    p.add_argument("--memory_batch_size", type=int, default=8, help="memory sentences per MLM step")
    p.add_argument("--memory_eval_per_lang", type=int, default=8,
                   help="SIB-200 dev sentences per memory language to measure MLM before/after (0 = skip)")
    p.add_argument("--mlm_prob", type=float, default=0.15, help="fraction of tokens masked for MLM")
    p.add_argument("--mlm_vocab", default="memory", choices=("memory", "full"),
                   help="softmax over the memory's subword ids (default, cheap) or all ids")
    p.add_argument("--mlm_head_steps", type=int, default=500,
                   help="steps (of 64 masked tokens) to fit an MLM head where the checkpoint has none")
    p.add_argument("--mlm_head_lr", type=float, default=1e-3, help="learning rate of the MLM head fit")
    p.add_argument("--train_embeddings", action="store_true", help="also fine-tune the word-embedding matrix")
    p.add_argument("--no_save", action="store_true", help="do not save the fine-tuned taggers")
    args = p.parse_args(argv)
    for flag in ("batch_size", "eval_batch_size", "epochs", "max_len", "log_every", "memory_per_lang",
                 "memory_batch_size", "mlm_head_steps"):
        if getattr(args, flag) < 1:
            raise XltError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("train_sentences", "dev_sentences", "pud_sentences", "tatoeba_limit", "eval_every",
                 "memory_eval_per_lang"):
        if getattr(args, flag) < 0:
            raise XltError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0 < args.mlm_prob < 1:
        raise XltError(f"--mlm_prob must be in (0, 1), got {args.mlm_prob}")
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    bad = [lang for lang in langs if lang not in LANGS]
    if not langs or bad:
        raise XltError(f"--langs: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(LANGS)}")
    args.langs = ",".join(langs)
    return args


def subsample(items, n, seed):
    """n items drawn without replacement (in their original order), or all of them when n is 0 or too big."""
    if not n or n >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    model.set_seed(args.seed)
    device = model.pick_device(args.device)
    data_dir = data.resolve_data_dir(args.data_dir)
    out_dir = Path(args.out_dir)
    methods = list(METHODS) if args.method == "all" else [args.method]
    langs = args.langs.split(",")
    pud_langs = ["en"] + [LANGS[lang][0] for lang in langs]
    memory_langs = [lang.strip() for lang in args.memory_langs.split(",") if lang.strip()]
    have = set(data.sib200_languages(data_dir))
    if not memory_langs or any(lang not in have for lang in memory_langs):
        raise XltError(f"--memory_langs: no SIB-200 language {', '.join(x for x in memory_langs if x not in have)}"
                       f" (FLORES codes like eng_Latn)")

    # --- data -----------------------------------------------------------------------------------------
    tok = data.load_tokenizer(args.checkpoint)
    prefix = evaluate.resolve_prefix("auto", args.checkpoint)
    train_sents = subsample(data.read_conllu(data.ud_ewt_file(data_dir, "train")), args.train_sentences, args.seed)
    dev_sents = subsample(data.read_conllu(data.ud_ewt_file(data_dir, "dev")), args.dev_sentences, args.seed)
    train = data.encode_tagged(tok, [s["words"] for s in train_sents], [s["upos"] for s in train_sents], args.max_len)
    pud_files = data.ud_pud_files(data_dir)
    pud = {code: data.read_conllu(pud_files[code])[:args.pud_sentences or None] for code in pud_langs}
    tatoeba = {}
    for lang in langs:
        foreign, english = data.read_tatoeba(data_dir, lang)
        n = args.tatoeba_limit or len(foreign)
        tatoeba[lang] = (foreign[:n], english[:n])
    enc = model.Encoder.from_pretrained(args.checkpoint, mlm_head=True).to(device)
    # The memory (SIB-200 train) and held-out sentences to measure how much MLM survives (SIB-200 dev).
    memory_examples = data.encode(tok, read_memory(data_dir, memory_langs, args.memory_per_lang), args.max_len)
    held_examples = data.encode(tok, read_memory(data_dir, memory_langs, args.memory_eval_per_lang, "dev"),
                                args.max_len) if args.memory_eval_per_lang else []
    vocab = mlm_vocab([memory_examples, held_examples], tok, enc.config.vocab_size, args.mlm_vocab == "full")
    memory = Memory(memory_examples, vocab, tok, enc.config.vocab_size, args.memory_batch_size, args.mlm_prob,
                    args.seed)
    held = Memory(held_examples, vocab, tok, enc.config.vocab_size, 32, args.mlm_prob, seed=1234)
    held_out = [held.batch(list(range(i, min(i + 32, len(held_examples)))))
                for i in range(0, len(held_examples), 32)]          # fixed masks, the same for every model
    print(f"[continual] {args.checkpoint} on {device}; EWT train {len(train)} / dev {len(dev_sents)} sentences; "
          f"memory {len(memory.examples)} sentences of {len(memory_langs)} languages (SIB-200 train), "
          f"MLM softmax over {len(memory.vocab)} ids; Tatoeba {args.tatoeba_limit or 'all'} pairs x {len(langs)}; "
          f"PUD {args.pud_sentences or 'all'} sentences x {len(pud_langs)}")

    # --- the previous task's head ---------------------------------------------------------------------
    mlm_info = {"source": "checkpoint"}
    if not enc.checkpoint_has_mlm_head:
        mlm_info = fit_mlm_head(enc, memory, args.mlm_head_steps, args.mlm_head_lr, device,
                                mlm_head_cache(out_dir, args))
        mlm_info["source"] = "fitted on the frozen encoder (the checkpoint has none)"
    enc.requires_grad_(False)

    # --- before fine-tuning ---------------------------------------------------------------------------
    results = {"config": vars(args), "device": str(device), "threads": torch.get_num_threads(),
               "mlm_head": mlm_info, "retrieval": {}, "pos": {}, "dev": {},
               "memory_mlm": {}, "train": {}}
    t = time.time()
    results["retrieval"]["before"] = retrieval_per_layer(enc, tok, tatoeba, device, prefix, args.eval_batch_size)
    if held_out:
        results["memory_mlm"]["before"] = memory_mlm_score(enc, held_out, memory.vocab, device)
    print(f"[continual] before fine-tuning: retrieval measured in {time.time() - t:.0f} s")
    pretrained = {k: v.detach().clone() for k, v in enc.state_dict().items()}

    # --- each method from the same pre-trained weights -----------------------------------------------
    for method in methods:
        t = time.time()
        model.set_seed(args.seed)
        enc.load_state_dict(pretrained)
        memory.generator.manual_seed(args.seed)
        head = model.TokenClassificationHead(enc.config.hidden_size, len(data.UPOS_TAGS)).to(device)
        info = finetune(enc, head, method, train, dev_sents, memory, tok, args, device)
        train_seconds = time.time() - t
        results["dev"][method] = info["dev"]
        results["pos"][method] = pos_eval(enc, head, tok, pud, device, args.eval_batch_size)
        results["retrieval"][method] = retrieval_per_layer(enc, tok, tatoeba, device, prefix, args.eval_batch_size)
        if held_out:
            results["memory_mlm"][method] = memory_mlm_score(enc, held_out, memory.vocab, device)
        results["train"][method] = {k: info[k] for k in ("steps", "projected_steps", "mean_cos_g_gref",
                                                           "shared_parameters", "history")}
        results["train"][method].update(seconds=round(train_seconds, 1), seconds_with_eval=round(time.time() - t, 1))
        if method == "gem":
            results["shared_parameter_names"] = info["shared_names"]
        if not args.no_save:
            model.save_pretrained(enc, out_dir / method, tokenizer=tok, head=head,
                                  extra={"xlt_continual": {"method": method, "dev_upos": round(info["dev"], 2)}})
        print(f"[continual] {method}: dev {info['dev']:.2f}, zero-shot PUD avg "
              f"{np.mean([v for k, v in results['pos'][method].items() if k != 'en']):.2f}, "
              f"last-layer retrieval avg {np.mean([v[-1] for v in results['retrieval'][method].values()]):.1f} "
              f"({time.time() - t:.0f} s)")

    # --- report ---------------------------------------------------------------------------------------
    results["seconds"] = round(time.time() - t0, 1)
    tables = report(results, langs)
    results["tables"] = tables
    evaluate.write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text("\n\n".join(tables.values()) + "\n", encoding="utf-8")
    print(f"[continual] wrote {out_dir / 'results.json'} and results.md ({results['seconds']:.0f} s)")
    return results


def report(results, langs):
    """The markdown tables, printed and returned: retrieval per layer (mean over languages), retrieval per
    language at the last layer, zero-shot POS per language, and the memory's MLM before/after."""
    rows = ["before"] + [m for m in METHODS if m in results["pos"]]
    ret = results["retrieval"]
    n_states = len(next(iter(ret["before"].values())))
    per_layer = {r: {("emb" if i == 0 else f"L{i}"): float(np.mean([ret[r][lang][i] for lang in langs]))
                     for i in range(n_states)} for r in rows}
    last = {r: {lang: ret[r][lang][-1] for lang in langs} for r in rows}
    tables = {
        "retrieval_per_layer": "Tatoeba xx->en top-1 per hidden state, mean over languages "
                               "(avg = mean over hidden states)\n\n" + evaluate.markdown_table(per_layer),
        "retrieval_last_layer": "Tatoeba xx->en top-1 at the last layer, per language\n\n"
                                + evaluate.markdown_table(last),
        "pos": "Zero-shot UPOS accuracy on UD PUD (en = the training language)\n\n"
               + evaluate.markdown_table({m: results["pos"][m] for m in rows[1:]}, train_lang="en"),
    }
    if results["memory_mlm"]:
        mm = results["memory_mlm"]
        tables["memory_mlm"] = ("Masked LM on held-out SIB-200 dev sentences of the memory languages\n\n"
                                "| model | MLM loss | MLM accuracy |\n|---|---:|---:|\n"
                                + "\n".join(f"| {r} | {mm[r][0]:.3f} | {mm[r][1]:.1f} |" for r in rows if r in mm))
    for table in tables.values():
        print("\n" + table)
    return tables


if __name__ == "__main__":
    try:
        main()
    except XltError as e:
        sys.exit(f"error: {e}")
