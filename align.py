"""align.py: post-pretraining alignment of a multilingual encoder with a little parallel data.

Paper: Lin Pan, Chung-Wei Hang, Haode Qi, Abhishek Shah, Saloni Potdar, Mo Yu (2021), "Multilingual BERT
Post-Pretraining Alignment", NAACL 2021 (arXiv 2010.12547). A pretrained multilingual encoder is aligned
on parallel data, word by word through Translation Language Modeling (TLM) and sentence by sentence
through contrastive learning (MoCo) with random input shuffling; fine-tuning then code-switches with
English. From mBERT it reports +4.7 points of zero-shot XNLI accuracy.

The method in five lines:
  1. per parallel pair a coin picks the query side (random input shuffling); the same coin puts that side
     first in the TLM sequence (Pan et al., Sec. 2.2);
  2. TLM: `[CLS] first [SEP] second [SEP]` through the query encoder f_q, 15% of the tokens masked
     (80/10/10) and predicted from both languages; positions run on across the pair, no language embeddings;
  3. MoCo: q = f_q(query sentence), k = f_k(key sentence) with the momentum encoder f_k (no gradient);
     the keys of recent batches wait in a FIFO queue as negatives;
  4. loss = tlm_weight * L_TLM + L_MoCo into f_q only; then theta_k <- m theta_k + (1-m) theta_q, enqueue k;
  5. fine-tuning on English: with probability p a training sentence is replaced by its translation.

The equations (MoCo: He et al. 2020, Eq. 1 and Algorithm 1):
    q = normalize(pool(f_q(x_q))),  k+ = normalize(pool(f_k(x_k))),  {k_i} = the queue
    L_MoCo = -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau))             moco_loss
    theta_k <- m theta_k + (1 - m) theta_q                                         momentum_update
    L_TLM  = mean over masked positions of -log p(original token | the masked pair)  model.mlm_loss

The paper's (its abstract, the issue's description, Sec. 2.2): TLM without language embeddings, positions
not reset; MoCo on [CLS] with a momentum key encoder and a queue; random input shuffling, which also
orders the TLM pair; both objectives trained together; code-switching with English in fine-tuning (for
pair tasks like XNLI: the premise or the hypothesis replaced by its English version).
Ours: K = 256, m = 0.99, tau = 0.07 (MoCo v1's tau; the queue must turn over and f_k move within the
~10^2 steps of a CPU run, not MoCo's 10^5); mean pooling by default (e5/MiniLM's sentence vector, the one
Tatoeba measures; `--pooling cls` is the paper's); the query is a separate pass of the query sentence
alone; queued keys of the query's own sentence id are not its negatives; f_k runs without dropout; the
word embeddings stay frozen (`--train_embeddings`), so the momentum update skips them; e5 and MiniLM have
no MLM head (a fresh one learns; mBERT's is pretrained); the parallel data (--align_data) is English paired
with --align_langs in UD PUD (default: 1,000 news/Wikipedia sentences, joined on sent_id; none of them is a
SIB-200 sentence, so the alignment sees neither the fine-tuning nor the test sentences: the run prints and
keeps the exact-text overlap per SIB-200 split, 0/0/0), or in SIB-200 train (`--align_data sib200`, joined on
index_id: the translations of the very sentences the classifier is then fine-tuned on, our earlier design,
which cannot separate alignment from seeing the task's sentences), or `--parallel FILE`; hence the default
--align_langs are PUD languages that SIB-200 has too; our task has single sentences, so code-switching
replaces the English training sentence by its SIB-200 train translation into one of --align_langs
(translate-train for those languages, not zero-shot: compare "aligned" with "unaligned" for alignment
alone); fine-tuning follows distill.py's protocol (4 epochs, batch 32, lr 1e-4, AdamW, 10% warmup, the
epoch best on English dev kept; 2 epochs before, which left English under-trained); the table adds the
transfer gap, English minus the zero-shot average (smaller = better transfer); Tatoeba retrieval always
uses mean pooling, on --eval_limit evenly spaced pairs (easier than the full set).

Run:
    python align.py                   # multilingual-e5-small; README.md has its time and results
    python align.py --align_langs deu_Latn,fra_Latn --align_steps 200 --cs_prob 0.3
    python align.py --align_data sib200 --align_langs deu_Latn,swh_Latn   # align on SIB-200 train's translations
    python align.py --parallel my.en-de.tsv           # align on your own parallel text
    python align.py --model bert-base-multilingual-cased --pooling cls --align_steps 2000 --device cuda \
        --align_batch_size 64 --queue_size 4096 --momentum 0.999 --epochs 4   # the paper's model; sizes ours
--epochs/--batch_size/--lr are the English SIB-200 fine-tuning (the epoch best on English dev is kept),
--align_steps/--align_batch_size/--align_lr the alignment; e5's "query: " prefix goes before every single
sentence, never inside a TLM pair. Outputs (--out_dir): aligned/ (encoder + MLM head), the four SIB-200
classifiers unaligned/, unaligned_cs/, aligned_finetuned/, aligned_cs/, results.json and results.md.
"""
import copy
import itertools
import statistics
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


# -------------------- 1. Parallel data ---------------------------------------------------------------

def sib200_pairs(data_dir, langs, pivot="eng_Latn", split="train"):
    """[{'a': English text, 'b': translation, 'id': index_id, 'lang'}] for every language in langs, joined on
    SIB-200's index_id within one split (train by default, so test sentences are never aligned on)."""
    pivot_rows = {r["index_id"]: r["text"] for r in data.read_sib200(data_dir, pivot, split)}
    return [{"a": pivot_rows[r["index_id"]], "b": r["text"], "id": r["index_id"], "lang": lang}
            for lang in langs for r in data.read_sib200(data_dir, lang, split) if r["index_id"] in pivot_rows]


def pud_pairs(data_dir, langs):
    """[{'a': English text, 'b': translation, 'id', 'lang'}] from UD PUD: 1,000 news and Wikipedia sentences
    translated from English into the same 20 languages, joined on '# sent_id' (id: the sentence's index in
    English PUD). No SIB-200 (FLORES) sentence is among them (overlap_with_sib200 counts it)."""
    files = data.ud_pud_files(data_dir)
    missing = [lang for lang in langs if data.pud_code(lang) not in files]
    if missing or "en" not in files:
        have = [f for f in data.LANGUAGES if data.pud_code(f) in files and f != "eng_Latn"]
        raise XltError(f"--align_langs: UD PUD has no {', '.join(missing) or 'eng_Latn'} (PUD languages: "
                       f"{','.join(have)}; --align_data sib200 pairs any SIB-200 language)")

    def texts(code):
        out = {}
        for s in data.read_conllu(files[code]):
            if not s["sent_id"] or not s["text"]:
                raise data.DataError(f"{files[code]}: a sentence without '# sent_id' or '# text' (PUD has both)")
            out[s["sent_id"]] = s["text"]
        return out
    english = texts("en")
    index = {sent_id: i for i, sent_id in enumerate(english)}
    return [{"a": english[k], "b": text, "id": index[k], "lang": lang}
            for lang in langs for k, text in texts(data.pud_code(lang)).items() if k in index]


def overlap_with_sib200(pairs, data_dir, langs):
    """{split: how many pairs have a side whose exact text (stripped) is a SIB-200 sentence of that split in
    English or one of langs}: 0 everywhere means the alignment never sees a fine-tuning or test sentence."""
    sides = [{p["a"].strip(), p["b"].strip()} for p in pairs]
    out = {}
    for split in ("train", "dev", "test"):
        sib = {r["text"].strip() for lang in ["eng_Latn", *langs] for r in data.read_sib200(data_dir, lang, split)}
        out[split] = sum(bool(s & sib) for s in sides)
    return out


def file_pairs(paths):
    """Pairs from --parallel: one two-column TSV, or two line-aligned files. The id is the line number."""
    out = [{"a": a, "b": b, "id": i, "lang": "file"} for i, (a, b) in enumerate(data.read_parallel(*paths))
           if a.strip() and b.strip()]
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


# -------------------- 2. Random input shuffling and Translation Language Modeling --------------------

def shuffle_coins(n, generator):
    """One fair coin per pair: True means side b is the query and comes first in the TLM sequence (both
    Pan et al., Sec. 2.2), False side a. Without it the query would always be English."""
    return torch.rand(n, generator=generator) < 0.5


def tlm_batch(examples, special, vocab_size, generator, mask_prob=0.15, position_offset=0):
    """A masked TLM batch of data.tlm_example outputs (`[CLS] a [SEP] b [SEP]`, token types all 0), in
    data.mlm_batch's keys (positions/targets: the masked flat indices and their original ids, for
    model.mlm_loss). Position ids are position_offset + 0..T-1 over the whole pair: the second sentence
    continues where the first ended (not reset, as in the paper; XLM resets them). Both sides are masked
    alike (15% of the real, non-special tokens; 80% [MASK], 10% random, 10% kept)."""
    return data.mlm_batch(examples, special, vocab_size, generator, mask_prob, position_offset=position_offset)


# -------------------- 3. MoCo: momentum key encoder, queue of negatives, contrastive loss -----------

def key_encoder(f_q):
    """f_k: a deep copy of the query encoder without the MLM head, never trained by gradient."""
    f_k = copy.deepcopy(f_q)
    f_k.mlm = None
    return f_k.requires_grad_(False).eval()    # keys are targets: computed without dropout (ours)


@torch.no_grad()
def momentum_update(f_q, f_k, m):
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter of f_k (MoCo Eq. 2). Parameters frozen in
    f_q are skipped: they are equal in both encoders and the update would leave them unchanged."""
    q_params = dict(f_q.named_parameters())
    pairs = [(p_k, q_params[name]) for name, p_k in f_k.named_parameters() if q_params[name].requires_grad]
    keys, queries = [k for k, _ in pairs], [q for _, q in pairs]
    torch._foreach_mul_(keys, m)            # one multi-tensor kernel each on CUDA, not two per parameter
    torch._foreach_add_(keys, queries, alpha=1 - m)


class KeyQueue:
    """MoCo's dictionary: the K most recent keys (unit vectors) and the ids of the pairs they came from.
    A FIFO: each batch of keys overwrites the oldest slots (self.ptr, a python int: no device sync)."""

    def __init__(self, size, dim, device, generator):
        # MoCo's code starts from random unit vectors; real keys replace them after size / batch steps
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    def push(self, keys, ids):
        size, n = len(self.keys), len(keys)
        if n > size:
            raise XltError(f"a batch of {n} keys does not fit a queue of {size} (--queue_size >= --align_batch_size)")
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = ids
        self.ptr = (self.ptr + n) % size


def moco_loss(q, k, queue_keys, tau, query_ids=None, queue_ids=None):
    """InfoNCE (MoCo Eq. 1): -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau)), averaged over the
    batch. q, k: (B, D) unit vectors, k[j] the positive of q[j]; queue_keys: (K, D) negatives. With ids,
    queue entries from the query's own pair id are left out of its negatives (another translation of it).
    Computed in fp32 with autocast off: under bf16 autocast the queue matmul would run in bf16, and with
    logits divided by a small tau (0.07) its 3 significant digits show, so CPU and GPU would optimise
    different losses."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        l_pos = (q * k).sum(1, keepdim=True)                              # (B, 1)
        l_neg = q @ queue_keys.float().T                                  # (B, K)
        if query_ids is not None:
            l_neg = l_neg.masked_fill(query_ids[:, None] == queue_ids[None, :], float("-inf"))
        logits = torch.cat([l_pos, l_neg], dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def sentence_vector(encoder, batch, pooling):
    """The L2-normalised sentence vector that MoCo contrasts: [CLS] (paper) or the mean of the tokens."""
    h = encoder(batch["input_ids"], batch["attention_mask"])
    return F.normalize(model.pool(h, batch["attention_mask"], pooling).float(), dim=-1)


# -------------------- 4. The alignment loop ----------------------------------------------------------

def prepare_pairs(tok, pairs, max_len, prefix):
    """Token ids of every pair, once: content ids (no special tokens) for the TLM sequence, and each side
    encoded alone (with the model's prefix) for MoCo."""
    a, b = [p["a"] for p in pairs], [p["b"] for p in pairs]
    return {"tlm_a": data.content_ids(tok, a, max_len), "tlm_b": data.content_ids(tok, b, max_len),
            "single_a": data.encode(tok, [prefix + t for t in a], max_len),
            "single_b": data.encode(tok, [prefix + t for t in b], max_len), "ids": [p["id"] for p in pairs]}


def alignment_batch(prepared, idx, special, vocab_size, generator, max_len, mask_prob=0.15, position_offset=0):
    """One step's batch, built on the CPU: {'tlm', 'query', 'key': tensor dicts, 'ids': pair ids}, and how
    many queries were side b. The coins are drawn before the masks, from the same generator."""
    coins = shuffle_coins(len(idx), generator).tolist()
    tlm, queries, keys = [], [], []
    for i, b_is_query in zip(idx, coins):
        q, k = ("b", "a") if b_is_query else ("a", "b")
        tlm.append(data.tlm_example(prepared["tlm_" + q][i], prepared["tlm_" + k][i], special["cls"],
                                    special["sep"], max_len))
        queries.append(prepared["single_" + q][i])
        keys.append(prepared["single_" + k][i])
    return {"tlm": tlm_batch(tlm, special, vocab_size, generator, mask_prob, position_offset),
            "query": data.pad_batch(queries, special["pad"]), "key": data.pad_batch(keys, special["pad"]),
            "ids": torch.tensor([prepared["ids"][i] for i in idx], dtype=torch.long)}, sum(coins)


def align(f_q, tok, pairs, args, device, seed, prefix=""):
    """Train f_q in place with TLM + MoCo for args.align_steps steps. Returns (the log, the key encoder)."""
    special, c, steps = data.special_ids(tok), f_q.config, args.align_steps
    prepared = prepare_pairs(tok, pairs, args.max_len, prefix)
    lengths = [len(x) + len(y) for x, y in zip(prepared["tlm_a"], prepared["tlm_b"])]
    f_q.embed.word.weight.requires_grad_(args.train_embeddings)
    f_q.train()
    f_k = key_encoder(f_q)
    generator = torch.Generator().manual_seed(seed)             # coins, masks, the initial queue
    queue = KeyQueue(args.queue_size, c.hidden_size, device, generator)
    opt = model.configure_optimizer([f_q], args.align_lr, args.weight_decay)
    if args.compile:                        # after the copy to f_k: compile the query encoder's blocks in place
        model.compile_blocks(f_q)
    # length-bucketed epochs over the pairs, as many as the steps need
    batches = (idx for epoch in itertools.count() for idx in data.bucket_batches(lengths, args.align_batch_size,
                                                                                 seed, epoch))
    log, losses, n_query_b, n_seen = [], model.LossLog(args.log_every, steps, "alignment", opt), 0, 0
    for step, idx in zip(tqdm(range(steps), desc="align"), batches):
        batch, n_b = alignment_batch(prepared, idx, special, c.vocab_size, generator, args.max_len,
                                     args.mask_prob, c.position_offset)
        batch = {k: v.to(device) if k == "ids" else data.to_device(v, device) for k, v in batch.items()}
        n_query_b, n_seen = n_query_b + n_b, n_seen + len(idx)
        lr = model.set_lr(opt, model.lr_schedule(step, steps, int(args.warmup * steps)))
        with model.autocast(device):
            loss_tlm = model.mlm_loss(f_q, batch["tlm"])[0] if args.tlm_weight > 0 else torch.zeros((), device=device)
            q = sentence_vector(f_q, batch["query"], args.pooling)
            with torch.no_grad():
                k = sentence_vector(f_k, batch["key"], args.pooling)
            loss_moco = moco_loss(q, k, queue.keys, args.temperature, batch["ids"], queue.ids)
            loss = args.tlm_weight * loss_tlm + loss_moco
        loss.backward()
        model.optimizer_step(opt)
        momentum_update(f_q, f_k, args.momentum)           # MoCo Algorithm 1: after the update of f_q
        queue.push(k, batch["ids"])
        if (means := losses.add(loss, loss_tlm, loss_moco)) is not None:
            log.append({"step": step + 1, **{name: round(v, 4) for name, v in zip(("loss", "tlm", "moco"), means)}})
            tqdm.write(f"[align] step {step + 1}/{steps}  TLM {means[1]:.4f}  MoCo {means[2]:.4f}  lr {lr:.2e}")
    losses.finish()
    f_q.eval()
    return {"log": log, "query_side_b": n_query_b / max(1, n_seen), "pairs_seen": n_seen}, f_k


# -------------------- 5. Code-switching in fine-tuning -----------------------------------------------

def code_switch_single(texts, alternatives, p, rng):
    """Code-switching for a single-sentence task with translations (SIB-200 is parallel): with probability p
    the sentence is replaced by one of its translations, drawn uniformly. Returns (new texts, per example the
    index of the translation used or None). An example without translations is kept."""
    out, used = [], []
    for text, alts in zip(texts, alternatives):
        used.append(int(rng.integers(len(alts))) if alts and rng.random() < p else None)
        out.append(text if used[-1] is None else alts[used[-1]])
    return out, used


# -------------------- 6. The experiment --------------------------------------------------------------

EVAL_LANGS = ["eng_Latn", "deu_Latn", "hin_Deva", "tha_Thai", "zho_Hans", "fra_Latn", "arb_Arab", "tur_Latn",
              "swh_Latn", "yor_Latn"]   # English, the 4 aligned by default, 5 others (zero-shot even with code-switch)


def experiment(args, seed, tok, pairs, source, setup, device, prefix, run, publish):
    """One seed, as units of the run folder: "seed0-align" (Tatoeba before, align, Tatoeba after; the aligned
    encoder is out/aligned, reloaded by a resumed run, or aligned again under --no_save), then one unit per
    fine-tune of {unaligned, aligned} on English SIB-200 with and without code-switching, tested on --langs.
    publish(seed, rows, details, outcomes) gets each finished unit's rows, details and per-sentence outcomes
    ({row: {language: outcomes}}, evaluate.compare)."""
    data_dir, langs, tatoeba_langs, train_rows, dev_rows, alternatives = setup
    out = Path(args.out_dir) / ("" if len(args.seeds) == 1 else f"seed{seed}")
    cs = f"code-switch p={args.cs_prob:g}"
    runs = {"unaligned": ("unaligned", 0.0), f"unaligned + {cs}": ("unaligned_cs", args.cs_prob),
            "aligned": ("aligned_finetuned", 0.0), f"aligned + {cs}": ("aligned_cs", args.cs_prob)}
    record = run.done(f"seed{seed}-align")
    done = {name: run.done(f"seed{seed}-{slug}") for name, (slug, _) in runs.items()}
    if record and all(done.values()):
        publish(seed, *record.values())
        for rec in done.values():
            publish(seed, *rec.values())
        return
    timings, t = {}, time.time()
    model.set_seed(seed)                    # a fresh MLM head is drawn here for e5/MiniLM
    f_q = model.Encoder.from_pretrained(args.model, mlm_head=args.tlm_weight > 0, dropout=args.dropout).to(device)
    evaluate.check_max_len(args.max_len, f_q, args.model)
    if not args.no_save:
        run.need(*[f_q] * 5)

    def tatoeba(encoder):                   # xx->en top-1 of every hidden state, mean pooling
        return evaluate.tatoeba(encoder, tok, data_dir, tatoeba_langs, device, True, args.eval_limit, prefix,
                                args.max_len, outcomes=True)
    base = key_encoder(f_q)                 # the unaligned encoder, a frozen copy for the baselines
    if record and (out / "aligned").is_dir():
        f_q = model.Encoder.from_pretrained(out / "aligned", dropout=args.dropout).to(device)
    else:                                   # (aligned again under --no_save: the same steps, the same encoder)
        if record is None:
            retrieval = {"before": tatoeba(base)}
            timings["tatoeba before"], t = time.time() - t, time.time()
        align_log, _ = align(f_q, tok, pairs, args, device, seed, prefix)
        timings["align"], t = time.time() - t, time.time()
        if not args.no_save:
            f_q.save_pretrained(out / "aligned", tokenizer=tok, extra={"xlt_prefix": prefix, "xlt_align": {
                "steps": args.align_steps, "data": source, "pooling": args.pooling, "seed": seed}})
    aligned, f_q = key_encoder(f_q), None   # the aligned encoder without its MLM head
    if record is None:
        retrieval["after"] = tatoeba(aligned)
        timings["tatoeba after"] = time.time() - t
        rows = {f"tatoeba {when}": {**{tatoeba_langs[lang]: r["xx->en"] for lang, r in res.items()},
                                    "avg": statistics.fmean(r["xx->en"] for r in res.values())}
                for when, res in retrieval.items() if res}
        record = run.finish(f"seed{seed}-align", {"rows": rows, "details": {
            "alignment": align_log, "timings": {k: round(v, 1) for k, v in timings.items()},
            "tatoeba pairs": {lang: r["n"] for lang, r in retrieval["before"].items()},
            "tatoeba per layer": {when: {lang: r["per_layer"] for lang, r in res.items()}
                                  for when, res in retrieval.items()}},
            "outcomes": {f"tatoeba {when}": {tatoeba_langs[lang]: r["hits"] for lang, r in res.items()}
                         for when, res in retrieval.items() if res}})
    publish(seed, *record.values())

    for name, (slug, p) in runs.items():
        if done[name] is None:
            t, switched = time.time(), []

            def epoch_rows(epoch):              # code-switching (none at p = 0), redrawn every epoch
                texts, used = code_switch_single([r["text"] for r in train_rows], alternatives, p,
                                                 np.random.default_rng([seed, epoch]))
                switched.append(round(sum(u is not None for u in used) / len(used), 3))
                return [{**r, "text": text} for r, text in zip(train_rows, texts)]
            encoder = copy.deepcopy(base if name.startswith("unaligned") else aligned).requires_grad_(True)
            encoder.embed.word.weight.requires_grad_(args.train_embeddings)
            if args.compile:
                model.compile_blocks(encoder)
            head, log = evaluate.finetune(encoder, tok, train_rows, dev_rows, args, device, seed, prefix,
                                          args.pooling, name, epoch_rows)
            scores, tested = evaluate.sib200_scores(encoder, head, tok, data_dir, langs, device, max_len=args.max_len,
                                                    prefix=prefix, limit=args.eval_limit, outcomes=True)
            seconds = time.time() - t
            if not args.no_save:
                model.save_pretrained(encoder, out / slug, tok, head, extra={"xlt_prefix": prefix, "xlt_align": {
                    "run": name, "english_dev": log["dev"], "epoch": log["best_epoch"], "seed": seed}})
            row = evaluate.with_averages(scores, "eng_Latn")
            if "eng_Latn" in scores and len(scores) > 1:    # the transfer gap: what English has that others lack
                row["transfer gap"] = row["eng_Latn"] - row["zero-shot avg"]
            print(f"[align] seed {seed}, {name}: English dev {log['dev']:.1f} (epoch {log['best_epoch']}), test avg "
                  f"{row['avg']:.1f}, {seconds:.0f} s")
            done[name] = run.finish(f"seed{seed}-{slug}", {"rows": {name: row}, "details": {
                "finetune": {name: {**log, "switched": switched}}, "timings": {"finetune " + name: round(seconds, 1)}},
                "outcomes": {name: tested}})
        publish(seed, *done[name].values())


def main(argv=None):
    args = evaluate.parse(build_parser(), argv)
    t0, device, data_dir = time.time(), model.pick_device(args.device), data.resolve_data_dir(args.data_dir)
    if args.queue_size < args.align_batch_size:
        raise XltError(f"--queue_size ({args.queue_size}) must be >= --align_batch_size ({args.align_batch_size})")
    if args.parallel is not None and len(args.parallel) > 2:
        raise XltError(f"--parallel takes one TSV file or two line-aligned files, got {len(args.parallel)}")
    if args.parallel is not None and args.align_data is not None:
        raise XltError("--align_data and --parallel exclude each other: --parallel FILE replaces the built-in data")
    align_data = args.align_data or "pud"
    align_langs = evaluate.resolve_langs(args.align_langs, "sib200", data_dir, flag="align_langs")
    if "eng_Latn" in align_langs and args.align_langs != "all":
        raise XltError("--align_langs must not contain eng_Latn: every language is paired with English")
    align_langs = [lang for lang in align_langs if lang != "eng_Latn" and (
        args.align_langs != "all" or align_data != "pud" or data.pud_code(lang))]
    langs = evaluate.resolve_langs(args.langs, "sib200", data_dir, default=EVAL_LANGS)
    run = evaluate.RunFolder(args, "align.py")                     # checked and locked before anything else
    have = set(data.tatoeba_languages(data_dir))            # Tatoeba measures the aligned languages
    tatoeba_langs = {data.tatoeba_code(f): f for f in align_langs if data.tatoeba_code(f) in have}   # code: FLORES
    prefix = evaluate.resolve_prefix(args.prefix, args.model)
    tok = data.load_tokenizer(args.model)
    if args.parallel:
        pairs, source = file_pairs(args.parallel), f"--parallel {' '.join(args.parallel)}"
    elif align_data == "pud":
        pairs, source = pud_pairs(data_dir, align_langs), f"UD PUD, English paired with {','.join(align_langs)}"
    else:
        pairs = sib200_pairs(data_dir, align_langs)
        source = f"SIB-200 train, English paired with {','.join(align_langs)}"
    overlap = overlap_with_sib200(pairs, data_dir, align_langs)
    train_rows = data.subset(data.read_sib200(data_dir, "eng_Latn", "train"), args.limit)
    translations = sib200_translations(data_dir, align_langs)
    setup = (data_dir, langs, tatoeba_langs, train_rows,
             data.subset(data.read_sib200(data_dir, "eng_Latn", "dev"), args.eval_limit),
             [translations.get(r["index_id"], []) for r in train_rows])
    print(f"[align] {len(pairs)} parallel pairs ({source}); Tatoeba {','.join(tatoeba_langs) or 'none'}; "
          f"prefix {prefix!r}; pooling {args.pooling}; device {device}")
    print(f"[align] pairs with a side that is a SIB-200 sentence (English or {','.join(align_langs)}), by split: "
          f"{overlap}")

    per_seed, details = {}, {"pairs": len(pairs), "data": source, "sib200_overlap": overlap, "prefix": prefix,
                             "code_switch": {"p": args.cs_prob, "langs": align_langs,
                                             "kind": "English train sentence -> its SIB-200 train translation"}}
    result, outcomes, zero_shot = None, {}, [lang for lang in langs if lang != "eng_Latn"]
    cs = f"code-switch p={args.cs_prob:g}"
    differences = [(m, "unaligned", "zero-shot avg", zero_shot) for m in ("aligned", f"aligned + {cs}") if zero_shot]
    if tatoeba_langs:
        differences.append(("tatoeba after", "tatoeba before", "avg", list(tatoeba_langs.values())))

    def publish(seed, rows, unit_details, unit_outcomes=None):  # results.json and .md after every finished unit
        nonlocal result
        per_seed.setdefault(seed, {}).update(rows)
        for name, tested in (unit_outcomes or {}).items():      # (none in a unit record older than the CIs)
            outcomes.setdefault(name, {})[seed] = tested
        mine = details.setdefault(f"seed {seed}", {"alignment": None, "finetune": {}, "timings": {}})
        for key, value in unit_details.items():
            mine[key] = {**mine[key], **value} if key in ("finetune", "timings") else value
        mean, std = evaluate.mean_std(per_seed)

        def table(row_name, tatoeba):           # one kind of rows, each cell the mean (± std) over seeds
            names = [n for n in mean if n.startswith("tatoeba") == tatoeba]
            return evaluate.markdown_table({n: mean[n] for n in names}, std={n: std[n] for n in names},
                                           row_name=row_name, averages=False)
        tables = [f"SIB-200 test accuracy (%); code-switching: p = {args.cs_prob:g} into {','.join(align_langs)}\n\n"
                  + table("fine-tuned on English", False)]
        if tatoeba_langs:
            curves = [details[f"seed {s}"]["tatoeba per layer"] for s in per_seed if "tatoeba before" in per_seed[s]]
            curves = {when: {lang: [statistics.fmean(v) for v in zip(*(c[when][lang] for c in curves))]
                             for lang in tatoeba_langs} for when in ("before", "after")}
            tables[:0] = [f"Tatoeba xx->en top-1 (%) per hidden state, mean over {','.join(tatoeba_langs)} (and seeds)"
                          "\n\n" + evaluate.per_layer_table(curves), "Tatoeba xx->en top-1 (%) at the last layer, "
                          f"{args.eval_limit or 'all'} pairs per language\n\n" + table("Tatoeba", True)]
        result = evaluate.write_results(args, "align.py", "Pan et al. 2021, Multilingual BERT Post-Pretraining "
                                        "Alignment (NAACL 2021)", per_seed, tables, details, device, t0, run,
                                        evaluate.compare(outcomes, differences))
    run.plan = [f"seed{seed}-{u}" for seed in args.seeds for u in
                ("align", "unaligned", "unaligned_cs", "aligned_finetuned", "aligned_cs")]
    for seed in args.seeds:
        experiment(args, seed, tok, pairs, source, setup, device, prefix, run, publish)
    return result


def build_parser():
    p = evaluate.add_common_args(
        evaluate.parser(__doc__), out_dir="out/align", epochs=4, batch_size=32, lr=1e-4, seeds=(0,),
        langs_help=f"SIB-200 test languages (default: {','.join(EVAL_LANGS)})", eval_limit=200,
        limit_help="fine-tune on N English SIB-200 training rows, evenly spaced (default: all 701)")
    p.add_argument("--model", type=evaluate.nonempty, default="intfloat/multilingual-e5-small",
                   help="encoder to align (hub name or directory; default: the embedded multilingual-e5-small)")
    p.add_argument("--align_langs", type=evaluate.name_list, default="deu_Latn,hin_Deva,tha_Thai,zho_Hans",
                   help="SIB-200 languages paired with English for alignment, which code-switching translates into "
                   "and Tatoeba measures ('all': every other one that --align_data has)")
    p.add_argument("--align_data", default=None, choices=("pud", "sib200"), help="parallel text to align on: pud "
                   "(default; UD PUD's 1,000 sentences, disjoint from SIB-200) or sib200 (SIB-200 train: the "
                   "translations of the English fine-tuning sentences)")
    p.add_argument("--parallel", type=evaluate.nonempty, nargs="+", default=None, metavar="FILE",
                   help="align on this parallel text instead: one TSV with two columns, or two line-aligned files")
    p.add_argument("--align_steps", type=evaluate.positive_int, default=60, help="alignment steps")
    p.add_argument("--align_batch_size", type=evaluate.positive_int, default=16, help="parallel pairs per step")
    p.add_argument("--align_lr", type=evaluate.positive_float, default=3e-5, help="alignment peak learning rate")
    p.add_argument("--tlm_weight", type=evaluate.nonneg_float, default=1.0, help="loss = w * TLM + MoCo (0: MoCo only)")
    p.add_argument("--mask_prob", type=evaluate.rate, default=0.15, help="TLM masking rate (BERT's 15%%)")
    p.add_argument("--queue_size", type=evaluate.positive_int, default=256, help="MoCo K: negatives in the queue")
    p.add_argument("--momentum", type=evaluate.fraction, default=0.99, help="MoCo m of the key encoder")
    p.add_argument("--temperature", type=evaluate.positive_float, default=0.07, help="MoCo tau (MoCo v1's)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"), help="sentence vector of MoCo and "
                   "of the classifier: mean (e5/MiniLM's native vector) or cls (the paper's, for mBERT)")
    p.add_argument("--cs_prob", type=evaluate.probability, default=0.5, help="code-switching probability p")
    return p


if __name__ == "__main__":
    evaluate.cli(main)
