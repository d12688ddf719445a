"""align.py: Post-Pretraining Alignment of a multilingual encoder with a little parallel data.

Paper: Lin Pan, Chung-Wei Hang, Haode Qi, Abhishek Shah, Saloni Potdar, Mo Yu (2021), "Multilingual BERT
Post-Pretraining Alignment", NAACL 2021 (arXiv 2010.12547). Starting from a pretrained multilingual
model, it aligns the representations of translations with parallel data, on the word level through
Translation Language Modeling (TLM) and on the sentence level through contrastive learning (MoCo) with
random input shuffling, and code-switches with English when fine-tuning. From mBERT it reports +4.7
points of zero-shot XNLI accuracy.

The method in five lines:
  1. each parallel pair (a, b): a coin decides which side is the query and which the key (random input
     shuffling), and which side comes first in the TLM sequence;
  2. TLM: `[CLS] first [SEP] second [SEP]` through the query encoder f_q, 15% of the tokens masked (80/10/10),
     each predicted from both languages; positions run on across the pair, no language embeddings;
  3. MoCo: q = f_q(query sentence), k = f_k(key sentence) with the momentum encoder f_k (no gradient), and
     the keys of recent batches in a FIFO queue as negatives;
  4. loss = tlm_weight * L_TLM + L_MoCo, back-propagated into f_q only; then theta_k <- m theta_k + (1-m) theta_q,
     and the batch's keys are enqueued (the oldest dequeued);
  5. fine-tuning on English: with probability p a training sentence is replaced by its translation
     (sentence-level code-switching).

The equations implemented (MoCo: He et al. 2020, Eq. 1 and Algorithm 1):
    q = normalize(pool(f_q(x_q))),  k+ = normalize(pool(f_k(x_k))),  {k_i} = the queue
    L_MoCo = -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau))                    moco_loss
    theta_k <- m theta_k + (1 - m) theta_q                                                momentum_update
    L_TLM  = mean over masked positions of -log p(original token | the masked pair)       tlm_loss

What is the paper's (its abstract, and the issue text that describes it; we could not read the full text):
TLM as word-level alignment, with positions not reset for the second sentence and no language
embeddings; MoCo on the [CLS] vector with a query encoder, a momentum key encoder and a queue of negatives;
random input shuffling; the two objectives trained together; code-switching with English in fine-tuning
(for sentence-pair tasks such as XNLI: the premise or the hypothesis replaced by its English version).

What is our choice (none of it is claimed to be the paper's):
  - defaults K = 256 keys, m = 0.99, tau = 0.07 (MoCo v1's temperature). MoCo's 65,536 keys and m = 0.999
    are meant for 10^5 steps; a CPU run here makes ~10^2, so the queue must turn over and the key encoder
    must move within that many steps;
  - `--pooling mean` by default: the MoCo vector (and the classifier) is the mean of the token states,
    because multilingual-e5 and MiniLM were trained to represent sentences that way and Tatoeba retrieval
    (evaluate.embed) reads exactly that vector; aligning e5's never-trained [CLS] state would leave the
    vector we measure untouched. `--pooling cls` is the paper's setting (use it for mBERT);
  - the MoCo query is a separate forward pass of the query sentence alone (not the [CLS] of the TLM
    sequence, which sees both languages); the queue starts as random unit vectors (MoCo's code);
    queued keys that translate the query's own sentence (same id: the default data pairs one English
    sentence with several languages) are not used as its negatives; the key encoder runs without dropout;
  - one coin per pair: the query side also comes first in the TLM sequence;
  - the word-embedding matrix is frozen by default in alignment and fine-tuning (`--train_embeddings` to
    train it): its 250k rows dominate a CPU optimizer step, rows of languages absent from the data should
    not drift, and with the tied MLM decoder frozen the TLM head predicts into the pretrained embedding
    space. The paper trains all of mBERT. Frozen parameters are equal in f_q and f_k, so the momentum
    update skips them (it would leave them unchanged);
  - the TLM loss is computed only at the masked positions (the 250k-way decoder is the costliest matmul);
  - multilingual-e5 and MiniLM have no MLM head: it is freshly initialised (model.py says so), so with the
    default student the TLM signal starts from a random head and mostly trains that head in a short run.
    mBERT (`--model bert-base-multilingual-cased`) has its pretrained head, as in the paper;
  - the parallel data: by default English paired with `--langs` through SIB-200's train split only (the
    same index_id is the same FLORES sentence), so no test sentence is ever seen; `--parallel FILE` aligns
    on any parallel text instead (a two-column TSV, or two line-aligned files);
  - code-switching for our single-sentence task: SIB-200's English training sentence is replaced with
    probability p by its translation (same index_id, train split) into one of `--langs`, drawn uniformly,
    redrawn every epoch. This uses translations of the training data, which exist only because SIB-200 is
    parallel: it is a form of translate-train, not a zero-shot setting for those languages. The paper's
    pair-task variant is `code_switch_pair` (no pair task in our data, so no run here uses it);
  - evaluation: Tatoeba xx->en top-1 per hidden state on a fixed random subset (`--tatoeba_n` pairs per
    language, so retrieval is among n candidates, easier than the full set; always mean pooling, as
    evaluate.embed does, whatever --pooling says); zero-shot SIB-200 test accuracy
    after fine-tuning on English with and without alignment, with and without code-switching; the epoch
    kept is the best on the English dev set. multilingual-e5 inputs get its "query: " prefix
    (evaluate.resolve_prefix) everywhere except inside TLM sequences.

Run:
    python align.py              # multilingual-e5-small: 15.5 min on ONE core of a 2-core CPU
    python align.py --langs deu_Latn,fra_Latn --steps 200 --cs_prob 0.3
    python align.py --parallel my.en-de.tsv           # align on your own parallel text
    # the paper's model (mBERT, with its pretrained MLM head) and [CLS] vector, for users with internet and a
    # GPU; the sizes are ours, scaled up from the CPU defaults (the paper's hyperparameters are not known to us):
    python align.py --model bert-base-multilingual-cased --pooling cls --steps 2000 --batch_size 64 \
        --queue_size 4096 --momentum 0.999 --epochs 4 --device cuda

Outputs (OUT_DIR = --out_dir, default out/align), all in Hugging Face layout (transformers.AutoModel loads them):
  OUT_DIR/aligned             the aligned encoder, with its (trained) MLM head
  OUT_DIR/{unaligned, unaligned_cs, aligned_finetuned, aligned_cs}
                              the four SIB-200 classifiers (encoder + head), each at its best English-dev epoch
  OUT_DIR/results.json        config, seconds, hardware, per-phase timings, the alignment log (TLM and MoCo
                              losses), Tatoeba per layer before/after, SIB-200 accuracies, fine-tuning logs,
                              which code-switching was used, and both markdown tables
"""
import argparse
import copy
import math
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

# ----------------------------------------------------------------------------------------------------
# 1. Parallel data
# ----------------------------------------------------------------------------------------------------


def sib200_pairs(data_dir, langs, pivot="eng_Latn", split="train"):
    """[{'a': English text, 'b': translation, 'id': index_id, 'lang'}] for every language in langs, joined on
    SIB-200's index_id within one split (train by default, so test sentences are never aligned on)."""
    pivot_rows = {r["index_id"]: r["text"] for r in data.read_sib200(data_dir, pivot, split)}
    pairs = []
    for lang in langs:
        pairs += [{"a": pivot_rows[r["index_id"]], "b": r["text"], "id": r["index_id"], "lang": lang}
                  for r in data.read_sib200(data_dir, lang, split) if r["index_id"] in pivot_rows]
    return pairs


def file_pairs(paths):
    """Pairs from --parallel: one two-column TSV, or two line-aligned files. The id is the line number."""
    pairs = data.read_parallel(*paths)
    out = [{"a": a, "b": b, "id": i, "lang": "file"} for i, (a, b) in enumerate(pairs) if a.strip() and b.strip()]
    if not out:
        raise data.DataError(f"--parallel {' '.join(map(str, paths))}: no non-empty sentence pairs")
    return out


def sib200_translations(data_dir, langs, split="train"):
    """{index_id: [the sentence in each of langs]}: what code-switching may put in place of English."""
    out = {}
    for lang in langs:
        for r in data.read_sib200(data_dir, lang, split):
            out.setdefault(r["index_id"], []).append(r["text"])
    return out


# ----------------------------------------------------------------------------------------------------
# 2. Random input shuffling
# ----------------------------------------------------------------------------------------------------

def shuffle_coins(n, generator):
    """One fair coin per pair: True means side b is the query (and comes first in the TLM sequence), False
    side a. Without it the query would always be English and the key always the other language."""
    return torch.rand(n, generator=generator) < 0.5


# ----------------------------------------------------------------------------------------------------
# 3. Translation Language Modeling
# ----------------------------------------------------------------------------------------------------

def tlm_batch(examples, special, vocab_size, generator, mask_prob=0.15, position_offset=0):
    """A masked TLM batch from data.tlm_example outputs (`[CLS] a [SEP] b [SEP]`, token types all 0).

    Position ids are written out explicitly: position_offset + 0..T-1 over the whole pair, so the second
    sentence continues where the first ended (not reset, as in the paper; XLM resets them). data.mask_tokens
    masks 15% of the real, non-special tokens of both sides alike (80% [MASK], 10% random, 10% kept).
    The flat indices of the masked positions and their labels are gathered here, on the CPU while the batch is
    built, so that the step selects them with index_select and never has to sync with the device."""
    batch = data.pad_batch(examples, special["pad"])
    B, T = batch["input_ids"].shape
    batch["position_ids"] = (position_offset + torch.arange(T)).expand(B, T) * batch["attention_mask"]
    batch["input_ids"], labels = data.mask_tokens(batch["input_ids"], batch["attention_mask"],
                                                  list(special.values()), special["mask"], vocab_size,
                                                  generator, prob=mask_prob)
    flat = labels.view(-1)
    batch["mlm_positions"] = (flat != -100).nonzero().squeeze(1)
    batch["mlm_labels"] = flat[batch["mlm_positions"]]
    return batch


def tlm_loss(f_q, batch):
    """Mean cross-entropy of the MLM head at the masked positions only (the decoder is a V-way matmul)."""
    h = f_q(batch["tlm_input_ids"], batch["tlm_attention_mask"], batch["tlm_token_type_ids"],
            batch["tlm_position_ids"])
    h = h.reshape(-1, h.shape[-1]).index_select(0, batch["tlm_mlm_positions"])
    logits = f_q.mlm_logits(h).float()
    # the count is a python int known when the batch was built: sum / count needs no device sync, and a
    # batch with no masked token (possible only in tiny tests) gives 0 instead of NaN
    return F.cross_entropy(logits, batch["tlm_mlm_labels"], reduction="sum") / max(1, batch["n_masked"])


# ----------------------------------------------------------------------------------------------------
# 4. MoCo: momentum key encoder, queue of negatives, contrastive loss
# ----------------------------------------------------------------------------------------------------

def key_encoder(f_q):
    """f_k: a deep copy of the query encoder without the MLM head, never trained by gradient."""
    mlm, f_q.mlm = f_q.mlm, None
    try:
        f_k = copy.deepcopy(f_q)
    finally:
        f_q.mlm = mlm
    for p in f_k.parameters():
        p.requires_grad_(False)
    return f_k.eval()             # keys are targets: computed without dropout (our choice)


@torch.no_grad()
def momentum_update(f_q, f_k, m):
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter of f_k (MoCo Eq. 2). Parameters frozen in
    f_q are skipped: they are equal in both encoders and the update would leave them unchanged."""
    q_params = dict(f_q.named_parameters())
    for name, p_k in f_k.named_parameters():
        p_q = q_params[name]
        if p_q.requires_grad:
            p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)


class KeyQueue:
    """MoCo's dictionary: the K most recent keys (unit vectors) and the ids of the pairs they came from.
    A FIFO: each batch of keys overwrites the oldest slots; `ordered()` lists them oldest first."""

    def __init__(self, size, dim, device, generator):
        # MoCo's code starts from random unit vectors; real keys replace them after size / batch steps
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0                                   # the oldest slot, a python int: no device sync

    def push(self, keys, ids):
        size, n = len(self.keys), len(keys)
        if n > size:
            raise XltError(f"a batch of {n} keys does not fit a queue of {size} (--queue_size >= --batch_size)")
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = ids
        self.ptr = (self.ptr + n) % size

    def ordered(self):
        return torch.roll(self.keys, -self.ptr, 0), torch.roll(self.ids, -self.ptr, 0)


def moco_loss(q, k, queue_keys, tau, query_ids=None, queue_ids=None):
    """InfoNCE (MoCo Eq. 1): -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau)), averaged over the
    batch. q, k: (B, D) unit vectors, k[j] the positive of q[j]; queue_keys: (K, D) negatives. With ids,
    queue entries from the query's own pair id are left out of its negatives (another translation of it)."""
    q, k = q.float(), k.float()
    l_pos = (q * k).sum(1, keepdim=True)                              # (B, 1)
    l_neg = q @ queue_keys.float().T                                  # (B, K)
    if query_ids is not None:
        l_neg = l_neg.masked_fill(query_ids[:, None] == queue_ids[None, :], float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def sentence_vector(encoder, input_ids, attention_mask, pooling):
    """The L2-normalised sentence vector that MoCo contrasts: [CLS] (paper) or the mean of the tokens."""
    return F.normalize(model.pool(encoder(input_ids, attention_mask), attention_mask, pooling).float(), dim=-1)


# ----------------------------------------------------------------------------------------------------
# 5. The alignment loop
# ----------------------------------------------------------------------------------------------------

def prepare_pairs(tok, pairs, max_len, prefix):
    """Token ids of every pair, once: content ids (no special tokens) for the TLM sequence, and each side
    encoded alone (with the model's prefix) for MoCo."""
    a, b = [p["a"] for p in pairs], [p["b"] for p in pairs]
    return {"tlm_a": data.content_ids(tok, a, max_len), "tlm_b": data.content_ids(tok, b, max_len),
            "single_a": data.encode(tok, [prefix + t for t in a], max_len),
            "single_b": data.encode(tok, [prefix + t for t in b], max_len),
            "ids": [p["id"] for p in pairs]}


def alignment_batch(prepared, idx, special, vocab_size, generator, max_len, mask_prob=0.15, position_offset=0):
    """Everything one step needs, built on the CPU: random input shuffling, the masked TLM sequences, the
    query and key sentences, and the pair ids."""
    coins = shuffle_coins(len(idx), generator).tolist()
    tlm, queries, keys = [], [], []
    for i, b_is_query in zip(idx, coins):
        q, k = ("b", "a") if b_is_query else ("a", "b")
        tlm.append(data.tlm_example(prepared["tlm_" + q][i], prepared["tlm_" + k][i], special["cls"],
                                    special["sep"], max_len))
        queries.append(prepared["single_" + q][i])
        keys.append(prepared["single_" + k][i])
    t = tlm_batch(tlm, special, vocab_size, generator, mask_prob, position_offset)
    batch = {"tlm_" + name: v for name, v in t.items()}
    qb, kb = data.pad_batch(queries, special["pad"]), data.pad_batch(keys, special["pad"])
    batch.update(q_input_ids=qb["input_ids"], q_attention_mask=qb["attention_mask"],
                 k_input_ids=kb["input_ids"], k_attention_mask=kb["attention_mask"],
                 ids=torch.tensor([prepared["ids"][i] for i in idx], dtype=torch.long))
    n_masked = len(t["mlm_positions"])
    return batch, n_masked, sum(coins)


def align(f_q, tok, pairs, args, device, prefix=""):
    """Train f_q in place with TLM + MoCo for args.steps steps. Returns (the log, the key encoder)."""
    special = data.special_ids(tok)
    c = f_q.config
    prepared = prepare_pairs(tok, pairs, args.max_len, prefix)
    lengths = [len(x) + len(y) for x, y in zip(prepared["tlm_a"], prepared["tlm_b"])]
    f_q.embed.word.weight.requires_grad_(args.train_embeddings)
    f_q.train()
    f_k = key_encoder(f_q)
    generator = torch.Generator().manual_seed(args.seed)          # masks, coins, the initial queue
    queue = KeyQueue(args.queue_size, c.hidden_size, device, generator)
    optimizer = model.configure_optimizer([f_q], args.lr, args.weight_decay)
    params = [p for p in f_q.parameters() if p.requires_grad]
    if args.compile:                        # after the copy to f_k: compile the query encoder's blocks in place
        for block in f_q.layers:
            block.compile()
    warmup = int(args.warmup * args.steps)

    def batches():                          # length-bucketed epochs over the pairs, as many as steps need
        epoch = 0
        while True:
            yield from data.bucket_batches(lengths, args.batch_size, args.seed, epoch)
            epoch += 1

    log, sums, n_log, n_query_b, n_seen = [], torch.zeros(3, device=device), 0, 0, 0
    source = batches()
    pbar = tqdm(range(args.steps), desc="align", dynamic_ncols=True)
    for step in pbar:
        idx = next(source)
        batch, n_masked, n_b = alignment_batch(prepared, idx, special, c.vocab_size, generator, args.max_len,
                                               args.mask_prob, c.position_offset)
        batch = data.to_device(batch, device)
        batch["n_masked"] = n_masked
        n_query_b += n_b
        n_seen += len(idx)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * model.lr_schedule(step, args.steps, warmup)
        with model.autocast(device):
            loss_tlm = tlm_loss(f_q, batch) if args.tlm_weight > 0 else torch.zeros((), device=device)
            q = sentence_vector(f_q, batch["q_input_ids"], batch["q_attention_mask"], args.pooling)
            with torch.no_grad():
                k = sentence_vector(f_k, batch["k_input_ids"], batch["k_attention_mask"], args.pooling)
            loss_moco = moco_loss(q, k, queue.keys, args.temperature, batch["ids"], queue.ids)
            loss = args.tlm_weight * loss_tlm + loss_moco
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        momentum_update(f_q, f_k, args.momentum)           # MoCo Algorithm 1: after the update of f_q
        queue.push(k, batch["ids"])
        sums += torch.stack([loss.detach(), loss_tlm.detach(), loss_moco.detach()])
        n_log += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            total, tlm, moco = (sums / n_log).tolist()        # the only host sync, every log_every steps
            log.append({"step": step + 1, "loss": round(total, 4), "tlm": round(tlm, 4), "moco": round(moco, 4)})
            pbar.set_postfix(tlm=f"{tlm:.3f}", moco=f"{moco:.3f}")
            pbar.write(f"[align] step {step + 1}/{args.steps}  TLM {tlm:.4f}  MoCo {moco:.4f}  "
                       f"lr {optimizer.param_groups[0]['lr']:.2e}")
            sums.zero_()
            n_log = 0
    f_q.eval()
    return {"log": log, "query_side_b": n_query_b / max(1, n_seen), "pairs_seen": n_seen}, f_k


# ----------------------------------------------------------------------------------------------------
# 6. Code-switching in fine-tuning
# ----------------------------------------------------------------------------------------------------

def code_switch_pair(pairs, english_pairs, p, rng):
    """The paper's sentence-level code-switching for a sentence-pair task (e.g. XNLI translate-train): with
    probability p, a fair coin picks the premise (0) or the hypothesis (1) and that side is replaced by its
    English version. Returns (new pairs, per example the replaced side or None)."""
    out, sides = [], []
    for (a, b), (en_a, en_b) in zip(pairs, english_pairs):
        if rng.random() < p:
            side = int(rng.random() < 0.5)
            out.append((en_a, b) if side == 0 else (a, en_b))
            sides.append(side)
        else:
            out.append((a, b))
            sides.append(None)
    return out, sides


def code_switch_single(texts, alternatives, p, rng):
    """Code-switching for a single-sentence task with translations (SIB-200 is parallel): with probability p
    the sentence is replaced by one of its translations, drawn uniformly. Returns (new texts, per example the
    index of the translation used or None). An example without translations is kept."""
    out, used = [], []
    for text, alts in zip(texts, alternatives):
        if alts and rng.random() < p:
            j = int(rng.integers(len(alts)))
            out.append(alts[j])
            used.append(j)
        else:
            out.append(text)
            used.append(None)
    return out, used


# ----------------------------------------------------------------------------------------------------
# 7. Fine-tuning on English SIB-200, and the evaluations
# ----------------------------------------------------------------------------------------------------

def finetune_sib200(encoder, tok, train_rows, dev_rows, alternatives, cs_prob, args, device, prefix="",
                    desc="finetune"):
    """Fine-tune encoder + a fresh ClassificationHead on English SIB-200 train (code-switched with probability
    cs_prob, redrawn each epoch), keeping the epoch best on English dev. Returns (head, info)."""
    model.set_seed(args.seed)                # the same head init and dropout for every run
    special = data.special_ids(tok)
    encoder.embed.word.weight.requires_grad_(args.train_embeddings)
    head = model.ClassificationHead(encoder.config.hidden_size, len(data.SIB200_LABELS), args.pooling).to(device)
    optimizer = model.configure_optimizer([encoder, head], args.ft_lr, args.weight_decay)
    params = [p for m in (encoder, head) for p in m.parameters() if p.requires_grad]
    n_batches = math.ceil(len(train_rows) / args.ft_batch_size)
    total, warmup = args.epochs * n_batches, int(args.warmup * args.epochs * n_batches)
    english = [r["text"] for r in train_rows]
    labels = [r["label"] for r in train_rows]
    dev_examples = data.encode(tok, [prefix + r["text"] for r in dev_rows], args.max_len)
    dev_labels = [r["label"] for r in dev_rows]
    if args.compile:
        for block in encoder.layers:
            block.compile()
    frozen = {name for name, p in encoder.named_parameters() if not p.requires_grad}
    info = {"dev": [], "switched": [], "loss": []}
    best, step, running, n = None, 0, torch.zeros((), device=device), 0
    for epoch in range(args.epochs):
        texts, used = code_switch_single(english, alternatives, cs_prob, np.random.default_rng([args.seed, epoch]))
        info["switched"].append(round(sum(u is not None for u in used) / len(used), 3))
        examples = data.encode(tok, [prefix + t for t in texts], args.max_len)
        for e, y in zip(examples, labels):
            e["label"] = y
        encoder.train()
        head.train()
        batches = data.bucket_batches([len(e["input_ids"]) for e in examples], args.ft_batch_size, args.seed, epoch)
        bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
        for idx in bar:
            batch = data.to_device(data.pad_batch([examples[i] for i in idx], special["pad"]), device)
            lr = args.ft_lr * model.lr_schedule(step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with model.autocast(device):
                h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                loss = F.cross_entropy(head(h, batch["attention_mask"]).float(), batch["label"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            n += 1
            step += 1
            if n == args.log_every or step == total:
                mean_loss = (running / n).item()                 # the only host sync, every log_every steps
                info["loss"].append([step, round(mean_loss, 4)])
                bar.write(f"[{desc}] step {step}/{total}  loss {mean_loss:.4f}  lr {lr:.2e}")
                running.zero_()
                n = 0
        dev = evaluate.accuracy(evaluate.predict_classes(encoder, head, dev_examples, special["pad"], device),
                                dev_labels)
        info["dev"].append(round(dev, 2))
        tqdm.write(f"[{desc}] epoch {epoch + 1}: English dev accuracy {dev:.1f}")
        if best is None or dev > best[0]:           # model selection on English dev only
            best = (dev, epoch, {k: v.detach().clone() for k, v in encoder.state_dict().items() if k not in frozen},
                    {k: v.detach().clone() for k, v in head.state_dict().items()})
    info["best_epoch"] = best[1] + 1
    encoder.load_state_dict(best[2], strict=False)      # frozen weights were never copied: unchanged
    head.load_state_dict(best[3])
    encoder.eval()
    head.eval()
    return head, info


def tatoeba_per_layer(encoder, tok, data_dir, langs, n, device, prefix="", max_len=128, batch_size=64):
    """{lang: [xx->en top-1 percent of each hidden state, embedding output first]} on a fixed random subset of
    n pairs per language (seed 0, the same subset before and after alignment), and {lang: subset size}."""
    curves, sizes = {}, {}
    for lang in langs:
        foreign, english = data.read_tatoeba(data_dir, lang)
        if n and n < len(foreign):
            keep = sorted(np.random.default_rng(0).choice(len(foreign), n, replace=False).tolist())
            foreign, english = [foreign[i] for i in keep], [english[i] for i in keep]
        x = evaluate.embed(encoder, tok, foreign, device, batch_size, max_len, all_layers=True, prefix=prefix)
        e = evaluate.embed(encoder, tok, english, device, batch_size, max_len, all_layers=True, prefix=prefix)
        curves[lang] = [evaluate.retrieval_top1(x[layer], e[layer])[0] for layer in range(len(x))]
        sizes[lang] = len(foreign)
    return curves, sizes


def per_layer_table(before, after):
    """Markdown: rows = hidden states, one column per language with 'before -> after', and the averages."""
    langs = list(before)
    n_states = len(next(iter(before.values())))
    lines = ["| hidden state | " + " | ".join(langs) + " | avg before | avg after | delta |",
             "|---|" + "---:|" * (len(langs) + 3)]
    for layer in range(n_states):
        b = [before[lang][layer] for lang in langs]
        a = [after[lang][layer] for lang in langs]
        mb, ma = sum(b) / len(b), sum(a) / len(a)
        cells = [f"{x:.1f} -> {y:.1f}" for x, y in zip(b, a)] + [f"{mb:.1f}", f"{ma:.1f}", f"{ma - mb:+.1f}"]
        lines.append(f"| {'emb' if layer == 0 else f'layer {layer}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# 8. Main
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(formatter_class=model.HelpFormatter, description="Post-Pretraining Alignment (Pan et al. 2021): TLM + MoCo on "
                                "parallel data, then zero-shot SIB-200 with and without code-switching.")
    p.add_argument("--model", default="intfloat/multilingual-e5-small", help="encoder to align (hub name or "
                   "directory; default: the embedded multilingual-e5-small)")
    p.add_argument("--data_dir", default=None, help="data folder (default: $XLT_DATA, else ~/.cache/xlt/data)")
    p.add_argument("--out_dir", default="out/align", help="results.json and the saved models")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python's random")
    p.add_argument("--compile", action="store_true", help="torch.compile the Transformer blocks")
    p.add_argument("--langs", default="deu_Latn,hin_Deva,swh_Latn,zho_Hans",
                   help="SIB-200 languages paired with English (train split) for alignment, and the languages "
                   "code-switching translates into (default: deu_Latn,hin_Deva,swh_Latn,zho_Hans; 'all': the "
                   "204 other than English)")
    p.add_argument("--parallel", nargs="+", default=None, metavar="FILE",
                   help="align on this parallel text instead: one TSV with two columns, or two line-aligned files")
    p.add_argument("--prefix", default="auto", help="text before every single-sentence input; 'auto': "
                   "'query: ' for intfloat/*e5* (how e5 was trained), else nothing")
    p.add_argument("--max_len", type=int, default=128, help="subword tokens per TLM pair and per sentence")
    # alignment
    p.add_argument("--steps", type=int, default=60, help="alignment steps (default 60)")
    p.add_argument("--batch_size", type=int, default=16, help="parallel pairs per alignment step")
    p.add_argument("--lr", type=float, default=3e-5, help="alignment peak learning rate")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's, on matrices only")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup (both loops)")
    p.add_argument("--tlm_weight", type=float, default=1.0, help="loss = tlm_weight * TLM + MoCo (0: MoCo only)")
    p.add_argument("--mask_prob", type=float, default=0.15, help="TLM masking rate (BERT's 15%%)")
    p.add_argument("--queue_size", type=int, default=256, help="MoCo K: negatives in the queue (our default 256)")
    p.add_argument("--momentum", type=float, default=0.99, help="MoCo m of the key encoder (our default 0.99)")
    p.add_argument("--temperature", type=float, default=0.07, help="MoCo tau (MoCo v1's 0.07)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"),
                   help="sentence vector of MoCo and of the classifier: mean (default; e5/MiniLM's native "
                   "vector) or cls (the paper's, for mBERT)")
    p.add_argument("--train_embeddings", action="store_true",
                   help="also train the word-embedding matrix (frozen by default, in both loops)")
    p.add_argument("--log_every", type=int, default=10, help="steps between logged losses")
    # fine-tuning and evaluation
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs on English SIB-200 train")
    p.add_argument("--ft_batch_size", type=int, default=32, help="sentences per SIB-200 fine-tuning step")
    p.add_argument("--ft_lr", type=float, default=1e-4, help="fine-tuning peak learning rate (distill.py's 1e-4)")
    p.add_argument("--cs_prob", type=float, default=0.5, help="code-switching probability p (our default 0.5)")
    p.add_argument("--eval_langs", default="eng_Latn,deu_Latn,hin_Deva,swh_Latn,zho_Hans,fra_Latn,arb_Arab,"
                   "tur_Latn,yor_Latn", help="SIB-200 test languages (default: English, the 4 aligned, 4 others)")
    p.add_argument("--tatoeba_langs", default="deu,hin,swh,cmn", help="Tatoeba languages (ISO 639-3)")
    p.add_argument("--tatoeba_n", type=int, default=200, help="pairs per Tatoeba language (0: all)")
    return p.parse_args(argv)


def check_args(args):
    for name in ("steps", "batch_size", "epochs", "ft_batch_size", "max_len", "queue_size", "log_every"):
        if getattr(args, name) < 1:
            raise XltError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.queue_size < args.batch_size:
        raise XltError(f"--queue_size ({args.queue_size}) must be >= --batch_size ({args.batch_size})")
    for name in ("cs_prob", "mask_prob", "warmup"):
        if not 0 <= getattr(args, name) <= 1:
            raise XltError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.momentum < 1:
        raise XltError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.temperature <= 0 or args.tlm_weight < 0 or args.tatoeba_n < 0:
        raise XltError("--temperature must be > 0, --tlm_weight and --tatoeba_n >= 0")
    if args.parallel is not None and len(args.parallel) > 2:
        raise XltError(f"--parallel takes one TSV file or two line-aligned files, got {len(args.parallel)}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    t0 = time.time()
    timings = {}
    device = model.pick_device(args.device)
    data_dir = data.resolve_data_dir(args.data_dir)
    out_dir = Path(args.out_dir)
    langs = evaluate.resolve_langs(args.langs, "sib200", data_dir)
    if "eng_Latn" in langs:                # English is the side every language is paired with
        if args.langs != "all":
            raise XltError("--langs must not contain eng_Latn: every language is paired with English")
        langs.remove("eng_Latn")
    eval_langs = evaluate.resolve_langs(args.eval_langs, "sib200", data_dir, flag="eval_langs")
    tatoeba_langs = evaluate.resolve_langs(args.tatoeba_langs, "tatoeba", data_dir, flag="tatoeba_langs")
    prefix = evaluate.resolve_prefix(args.prefix, args.model)
    model.set_seed(args.seed)

    tok = data.load_tokenizer(args.model)
    f_q = model.Encoder.from_pretrained(args.model, mlm_head=args.tlm_weight > 0).to(device)
    c = f_q.config
    # + 8: data.pad_batch pads T up to a multiple of 8, and BERT-style models number the pads too
    if args.max_len + 8 + c.position_offset > c.max_position_embeddings:
        raise XltError(f"--max_len {args.max_len}: the model has only {c.max_position_embeddings} positions")
    pairs = file_pairs(args.parallel) if args.parallel else sib200_pairs(data_dir, langs)
    source = f"--parallel {' '.join(args.parallel)}" if args.parallel else \
        f"SIB-200 train, English paired with {','.join(langs)}"
    print(f"[align] {len(pairs)} parallel pairs ({source}); prefix {prefix!r}; pooling {args.pooling}; device {device}")
    base = key_encoder(f_q)                # the unaligned encoder, kept for the baselines (a frozen copy)

    t = time.time()
    before, sizes = tatoeba_per_layer(base, tok, data_dir, tatoeba_langs, args.tatoeba_n, device, prefix, args.max_len)
    timings["tatoeba_before"] = time.time() - t

    t = time.time()
    align_info, _ = align(f_q, tok, pairs, args, device, prefix)
    timings["align"] = time.time() - t
    f_q.save_pretrained(out_dir / "aligned", tokenizer=tok, extra={"xlt_prefix": prefix, "xlt_align": {
        "method": "Pan et al. 2021 post-pretraining alignment (TLM + MoCo)", "steps": args.steps,
        "data": source, "pooling": args.pooling, "seed": args.seed}})
    aligned = key_encoder(f_q)             # the aligned encoder without MLM head, frozen copy
    del f_q

    t = time.time()
    after, _ = tatoeba_per_layer(aligned, tok, data_dir, tatoeba_langs, args.tatoeba_n, device, prefix, args.max_len)
    timings["tatoeba_after"] = time.time() - t

    # Fine-tune on English SIB-200 and evaluate zero-shot: {unaligned, aligned} x {code-switching off, on}
    train_rows = data.read_sib200(data_dir, "eng_Latn", "train")
    dev_rows = data.read_sib200(data_dir, "eng_Latn", "dev")
    translations = sib200_translations(data_dir, langs, "train")
    alternatives = [translations.get(r["index_id"], []) for r in train_rows]
    cs = f"code-switch p={args.cs_prob:g}"
    runs = {"unaligned": ("unaligned", base, 0.0), f"unaligned + {cs}": ("unaligned_cs", base, args.cs_prob),
            "aligned": ("aligned_finetuned", aligned, 0.0), f"aligned + {cs}": ("aligned_cs", aligned, args.cs_prob)}
    sib, finetune_info = {}, {}
    for name, (slug, start, p) in runs.items():
        t = time.time()
        encoder = copy.deepcopy(start)
        for param in encoder.parameters():
            param.requires_grad_(True)
        head, info = finetune_sib200(encoder, tok, train_rows, dev_rows, alternatives, p, args, device, prefix,
                                     desc=name)
        sib[name] = evaluate.sib200_scores(encoder, head, tok, data_dir, eval_langs, device, max_len=args.max_len,
                                           prefix=prefix)
        info["seconds"] = round(time.time() - t, 1)
        finetune_info[name] = info
        timings["finetune " + name] = time.time() - t
        model.save_pretrained(encoder, out_dir / slug, tokenizer=tok, head=head, extra={
            "xlt_prefix": prefix, "xlt_align": {"run": name, "english_dev": max(info["dev"]),
                                                "epoch": info["best_epoch"], "seed": args.seed}})
        zero_shot = [v for lang, v in sib[name].items() if lang != "eng_Latn"]
        print(f"[align] {name}: English dev {max(info['dev']):.1f} (epoch {info['best_epoch']}), zero-shot avg "
              f"{sum(zero_shot) / len(zero_shot) if zero_shot else float('nan'):.1f}, {info['seconds']:.0f} s "
              f"-> {out_dir / slug}")
        del encoder, head

    seconds = time.time() - t0
    hardware = f"{model.hardware(device)}, device {device}"
    table_tatoeba = per_layer_table(before, after)
    table_sib = evaluate.markdown_table(sib, train_lang="eng_Latn", row_name="fine-tuned on English")
    print(f"\nTatoeba xx->en top-1 (mean pooling, {', '.join(f'{k} n={v}' for k, v in sizes.items())}), "
          f"before -> after alignment:")
    print(table_tatoeba)
    print(f"\nSIB-200 test accuracy, fine-tuned on English (code-switching: English training sentence -> its "
          f"SIB-200 train translation into {','.join(langs)} with p={args.cs_prob:g}):")
    print(table_sib)
    print(f"\n[align] seed {args.seed}; {hardware}; {seconds:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    evaluate.write_json(out_dir / "results.json", {
        "config": vars(args), "seconds": round(seconds, 1), "hardware": hardware, "prefix": prefix,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "alignment": {"pairs": len(pairs), **align_info},
        "tatoeba": {"subset_sizes": sizes, "before": {k: [round(x, 1) for x in v] for k, v in before.items()},
                    "after": {k: [round(x, 1) for x in v] for k, v in after.items()}},
        "code_switch": {"kind": "single-sentence: English SIB-200 train sentence replaced by its translation "
                                "(same index_id, train split) into one of langs, drawn uniformly",
                        "p": args.cs_prob, "langs": langs},
        "sib200": {run: {lang: round(v, 1) for lang, v in scores.items()} for run, scores in sib.items()},
        "finetune": finetune_info,
        "tables": {"tatoeba": table_tatoeba, "sib200": table_sib}})
    print(f"[align] wrote {out_dir / 'results.json'}, the aligned encoder {out_dir / 'aligned'} and the four "
          f"classifiers {', '.join(str(out_dir / slug) for slug, _, _ in runs.values())}")
    return {"sib200": sib, "tatoeba_before": before, "tatoeba_after": after}


if __name__ == "__main__":
    try:
        main()
    except XltError as e:
        sys.exit(f"error: {e}")
