"""transfer.py: give an English encoder a foreign vocabulary (RAMEN), then classify zero-shot.

Paper: Ke Tran (2020), "From English To Foreign Languages: Transferring Pre-trained Language Models",
arXiv:2002.07306 (RAMEN). Its abstract: transfer an existing English pre-trained model to a foreign language
on a small budget (a foreign BERT-base within a day on one GPU); in six languages the transferred models
beat multilingual BERT on zero-shot natural language inference and dependency parsing.

The method in five lines:
  1. Learn a foreign WordPiece vocabulary on foreign text; special tokens keep their English ids.
  2. Align subword-tokenised English-foreign bitext both ways, symmetrise, count the links: p(e | f).
  3. E_f[i] = sum_j p(e_j | f_i) E_e[j] (and the same average of the MLM output bias).
  4. Stage A (ours): foreign MLM training only E_f, b_f. Stage B: English + foreign MLM, one shared encoder.
  5. Fine-tune on the English task with the word embeddings frozen, swap E_f in for E_e: zero-shot.

Equations:
  IBM Model 1 (Brown et al. 1993): f_1..m generated from e_0..l (e_0 = NULL), trained by EM:
    E-step P(a_j = i | e, f) = t(f_j | e_i) / sum_i' t(f_j | e_i');  M-step t(f | e) = c(e, f) / sum_f' c(e, f')
    Viterbi a_j = argmax_i t(f_j | e_i), in both directions, symmetrised by grow-diag-final-and.
  p(e | f) = n(f ~ e) / sum_e' n(f ~ e'),  n = the number of symmetrised links between f and e.
  RAMEN init  E_f[i] = sum_j p(e_j | f_i) E_e[j],  b_f[i] = sum_j p(e_j | f_i) b_e[j].
  Stage A  min over (E_f, b_f) of MLM_f;  Stage B  min over all of MLM_e(E_e, b_e, θ) + MLM_f(E_f, b_f, θ).
  MLM  -log softmax(E LN(gelu(D h_t)) + b)[x_t] at masked t: the language's own E (tied) and b, shared D, LN.

The paper's, as its public code shows (GitHub alexa/ramen: demo.sh, alignment/get_prob_para.py, utils/init_weight.py,
src/models.py, ramen.py; not the full paper): fast_align both ways, grow-diag-final-and; p(e|f) = link counts normalised
per foreign subword; unlinked rows N(0, 1/H), bias 0; special tokens' rows and biases copied from English, then any
translated row written over them (a linked [UNK]); the random baseline = the same without p(e|f); the encoder,
position/type embeddings, embedding LayerNorm and MLM transform shared; each update adds the gradients of one English
and one foreign MLM batch (our Stage B); WordPiece with accents kept.
Ours: Stage A (ramen.py trains everything from the first step; models.py's helper returning E_f and b_f, "useful when
freezing the encoder parameters", is never called); Stage 0 (MiniLM has no MLM head: model.fit_mlm_head fits one on the
frozen encoder's stored states, masks drawn once); IBM Model 1 in numpy, not fast_align (then atools' own
grow-diag-final-and); corpora ~1,000x smaller (SIB-200 train+dev, Tatoeba, UD PUD, NusaX; never a scored test
sentence); BERT's masking, AdamW, linear schedule, clipping 1.0 (ramen.py:
Adam, inverse square root, clipping 5, batch 72, 6 x 20,000 updates); SIB-200 instead of XNLI and parsing; the rows
"English model, no transfer" and a multilingual reference; several --langs: RAMEN's eng_Latn = the per-language mean.
The built-in bitext holds SIB-200 train+dev, i.e. the translations of the English fine-tuning sentences:
`--no_sib_bitext` leaves every SIB-200 sentence out (details: corpora, sib200_in_bitext), to show the result
without them. Every MLM loss curve is kept (details: runs) with last_quarter_drop_%, how much it still fell
over the last quarter of its steps (near 0: levelled off); `--random_stage_a_steps N` gives the random
baseline a longer Stage A than RAMEN's when its loss has not levelled off (then the budgets differ: say so).
Saved (first seed; not with --no_save): OUT_DIR/<lang>, the foreign model after Stage B (a teacher for
mblm.py), and OUT_DIR/<lang>-classifier, fine-tuned on English with E_f swapped in (model.load_with_head).
Run:  XLT_DATA=/work/shared/data python transfer.py --langs deu_Latn,swh_Latn --seeds 0 1 2
      python transfer.py --mono my.de.txt --parallel my.en-de.tsv             # English<TAB>foreign per line
      python transfer.py --no_sib_bitext --random_stage_a_steps 600        # no SIB-200 bitext; a longer random
"""
import copy
import dataclasses
import itertools
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

import data
import evaluate
import model
from model import XltError

NUSAX_NAME = dict(ind_Latn="indonesian", ace_Latn="acehnese", bjn_Latn="banjarese", ban_Latn="balinese",
                  bug_Latn="buginese", jav_Latn="javanese", min_Latn="minangkabau", sun_Latn="sundanese",
                  bbc_Latn="toba_batak")                                                       # FLORES -> NusaX


# -------------------- 1. Corpora: bitext and foreign text, never a scored test sentence ----------------

def builtin_corpora(data_dir, lang, sib200=True):
    """(bitext [(english, foreign)], extra foreign text, {source: size}) from the shared data: SIB-200
    train+dev (joined on index_id; not with sib200=False), Tatoeba, UD PUD (joined on sent_id), NusaX."""
    root, code, iso = data.resolve_data_dir(data_dir), data.tatoeba_code(lang), data.pud_code(lang)
    pairs = [p for split in ("train", "dev") if sib200 for p in data.sib200_parallel(root, "eng_Latn", lang, split)]
    mono, sources = [], {f"Tatoeba {code}-eng": 0, "UD PUD (sent_id)": 0}
    if sib200:
        sources = {"SIB-200 train+dev (index_id)": len(pairs), **sources}
    if (root / "tatoeba" / f"tatoeba.{code}-eng.{code}").is_file():
        foreign, english = data.read_tatoeba(data_dir, code)
        pairs, sources[f"Tatoeba {code}-eng"] = pairs + list(zip(english, foreign)), len(foreign)
    pud = data.ud_pud_files(data_dir) if (root / "ud").is_dir() else {}
    if iso in pud and "en" in pud:
        en, fx = ({s["sent_id"]: s["text"] for s in data.read_conllu(pud[c]) if s["text"]} for c in ("en", iso))
        both = [(en[k], fx[k]) for k in en if k in fx]
        pairs, sources["UD PUD (sent_id)"] = pairs + both, len(both)
    if lang in NUSAX_NAME and (root / "nusax").is_dir():
        name, splits = NUSAX_NAME[lang], ("train", "valid", "test")
        mt = [p for s in splits for p in data.read_nusax_mt(data_dir, name, s)]
        mono = [r["text"] for s in splits for r in data.read_nusax(data_dir, name, s)]
        pairs, sources["NusaX mt"], sources["NusaX sentiment (foreign text only)"] = pairs + mt, len(mt), len(mono)
    return pairs, mono, sources


def corpora(args, lang):
    """(bitext, foreign text, English text, sources): built in or --parallel/--mono, deduplicated, without any
    scored SIB-200 test sentence, --limit rows of the bitext and of the extra foreign text. Foreign text = the
    bitext's foreign side + that; English text (Stages 0, B) = the bitext's English side + SIB-200 train+dev.
    --no_sib_bitext: no SIB-200 sentence at all (train and dev too) in the bitext and the foreign text, so no
    translation of an English fine-tuning sentence is seen; the English text keeps SIB-200 train+dev."""
    if args.parallel:
        bitext = data.read_parallel(args.parallel)
        mono, sources = [], {f"--parallel {args.parallel}": len(bitext)}
    else:
        bitext, mono, sources = builtin_corpora(args.data_dir, lang, sib200=not args.no_sib_bitext)
    if args.mono:
        mono = data.read_mono(args.mono)
        sources[f"--mono {args.mono}"] = len(mono)
    scored = {r["text"].strip() for x in ("eng_Latn", lang)
              for split in (("train", "dev", "test") if args.no_sib_bitext else ("test",))
              for r in data.read_sib200(args.data_dir, x, split)}
    clean = list(dict.fromkeys((e.strip(), f.strip()) for e, f in bitext if e.strip() and f.strip()))
    if len(clean) < len(bitext):
        print(f"[transfer] {len(bitext) - len(clean)} of {len(bitext)} pairs left out (an empty side or a repeat)")
    kept = data.subset([(e, f) for e, f in clean if e not in scored and f not in scored], args.limit)
    extra = data.subset([s for s in map(str.strip, mono) if s and s not in scored], args.limit)
    if not kept:
        raise XltError("the bitext is empty: pass --parallel FILE (English<TAB>foreign per line)")
    foreign = list(dict.fromkeys([f for _, f in kept] + extra))
    english = list(dict.fromkeys([e for e, _ in kept] + [r["text"] for split in ("train", "dev")
                                                         for r in data.read_sib200(args.data_dir, "eng_Latn", split)]))
    print(f"[transfer] {lang}: {len(kept)} pairs, {len(foreign)} foreign and {len(english)} English sentences; "
          f"{sources}{'; no SIB-200 sentence in the bitext' if args.no_sib_bitext else ''}")
    return kept, foreign, english, sources


# -------------------- 2. The foreign vocabulary ------------------------------------------------------

def train_foreign_tokenizer(texts, vocab_size, eng_tok):
    """A WordPiece tokenizer learned on `texts` (the `tokenizers` trainer), BERT-style pre-tokenisation. The
    special tokens are the English model's, each at its English id when that id lies inside the foreign
    vocabulary (BERT: [PAD]=0, [UNK]..[MASK]=100..103), so their rows copy across and pad_token_id stays
    valid; any other special goes to the end. The learned pieces fill the remaining ids in sorted order."""
    roles = data.special_ids(eng_tok)                          # role -> English id
    names = {role: eng_tok.id_to_token(i) for role, i in roles.items()}
    lowercase = eng_tok.normalizer is not None and eng_tok.normalizer.normalize_str("AB") == "ab"
    normalizer = normalizers.BertNormalizer(strip_accents=False, lowercase=lowercase)   # accents kept, as RAMEN
    learner = Tokenizer(models.WordPiece(unk_token=names["unk"]))
    learner.normalizer, learner.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(names.values()),
                                        continuing_subword_prefix="##", show_progress=False)
    learner.train_from_iterator(texts, trainer)
    # The trainer breaks ties in hash order, so the pieces can differ from process to process (a resumed run reuses
    # the saved tokenizer: main); sorting only makes the ids of one set of pieces canonical.
    learned = sorted(t for t in learner.get_vocab() if t not in names.values())
    V, late = len(learned) + len(names), []                    # late: roles whose id is past the end (or the tail) move
    while moved := [r for r, i in roles.items() if r not in late and i >= V - len(late)]:
        late += moved
    at, pieces = {i: names[r] for r, i in roles.items() if r not in late}, iter(learned)
    ids = {t: i for i, t in enumerate([at[i] if i in at else next(pieces) for i in range(V - len(late))] +
                                      [names[r] for r in late])}
    tok = Tokenizer(models.WordPiece(ids, unk_token=names["unk"], max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    cls, sep = names["cls"], names["sep"]
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                                                       special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
    tok.add_special_tokens(list(names.values()))
    if len(ids) > vocab_size:          # WordPiece keeps every character it saw, whatever the size asked for
        print(f"[transfer] --vocab_size {vocab_size}: the foreign text's characters alone need {len(ids)} ids "
              "(the foreign vocabulary keeps them all)")
    return tok


# -------------------- 3. Translation probabilities p(e | f): IBM Model 1 both ways, symmetrised links --

def ibm1(src, tgt, iterations=5):
    """IBM Model 1 (Brown et al. 1993) by EM: each target token is generated by one source token or NULL, with
    probability t(tgt | src). src, tgt: sentence-aligned token-id sequences. Returns (table, links): table =
    (pair_src, pair_tgt, prob) over co-occurring pairs (pair_src -1 = NULL); links[k] = the (source position,
    target position) Viterbi links of sentence k, NULL links left out. Vectorised: one row per (target token,
    source position incl. NULL) of a sentence; t lives only on co-occurring pairs, where EM can put mass."""
    sents = [(np.asarray([-1] + list(s), dtype=np.int64), np.asarray(t, dtype=np.int64)) for s, t in zip(src, tgt)]
    n_slots = sum(len(t) for _, t in sents)                          # slot = one target token; source 0 = NULL
    if n_slots == 0:
        raise XltError("IBM Model 1: the bitext has no tokens")
    S = np.concatenate([np.tile(s, len(t)) for s, t in sents])
    T = np.concatenate([np.repeat(t, len(s)) for s, t in sents])
    slot = np.repeat(np.arange(n_slots), np.concatenate([np.full(len(t), len(s)) for s, t in sents]))
    spos = np.concatenate([np.tile(np.arange(len(s)) - 1, len(t)) for s, t in sents])      # -1 = NULL
    slot_sent = np.repeat(np.arange(len(sents)), [len(t) for _, t in sents])
    slot_tpos = np.concatenate([np.arange(len(t)) for _, t in sents])
    width = int(T.max()) + 1
    pairs, pair_of = np.unique((S + 1) * width + T, return_inverse=True)
    pair_src, pair_tgt = pairs // width - 1, pairs % width
    prob = np.ones(len(pairs))            # t uniform at the start: the first E-step spreads each token evenly
    for _ in range(iterations):
        p = prob[pair_of]
        z = np.bincount(slot, weights=p, minlength=n_slots)                 # sum_i t(f_j | e_i)
        posterior = p / z[slot]                                              # P(a_j = i | e, f)
        counts = np.bincount(pair_of, weights=posterior, minlength=len(pairs))
        total = np.bincount(pair_src + 1, weights=counts)                   # sum_f c(e, f)
        prob = counts / total[pair_src + 1]
    # Viterbi: a_j = argmax_i t(f_j | e_i); lexsort is stable, so ties go to the earlier position (NULL).
    order = np.lexsort((-prob[pair_of], slot))
    best = order[np.concatenate([[0], np.flatnonzero(np.diff(slot[order])) + 1])]   # one row per target token
    links = [set() for _ in src]
    for k, i, j in zip(slot_sent.tolist(), spos[best].tolist(), slot_tpos.tolist()):
        if i >= 0:
            links[k].add((i, j))
    return (pair_src, pair_tgt, prob), links


NEIGHBOURS = [(-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]


def grow_diag_final_and(e2f, f2e):
    """Symmetrise two directional alignments, sets of (e position, f position) links, exactly as fast_align's
    `atools -i e2f -j f2e -c grow-diag-final-and` (Koehn et al. 2003; clab/fast_align src/atools.cc, GDFACommand).
    e2f: the links of the model that generates the foreign sentence from the English one (fast_align's forward
    run on "English ||| foreign", as RAMEN's demo.sh), f2e: the reverse run's, both written (e, f).
    1. Start from the intersection.
    2. Grow: scan the union's remaining links in (e, f) order; add a link when one of its 8 neighbours (diagonals
       too) is already aligned and its e or its f word is still unaligned. Links added during a scan count at
       once for the rest of it (atools updates the alignment in place); scan again until a scan adds nothing.
    3. Final-and: scan e2f, then f2e, in (e, f) order; add a link whose e and f words are both still unaligned."""
    union, links = e2f | f2e, e2f & f2e
    aligned_e, aligned_f = {e for e, _ in links}, {f for _, f in links}
    grew = True
    while grew:
        grew = False
        for e, f in sorted(union - links):
            if (e not in aligned_e or f not in aligned_f) and any((e + de, f + df) in links for de, df in NEIGHBOURS):
                links.add((e, f)), aligned_e.add(e), aligned_f.add(f)
                grew = True
    for e, f in sorted(e2f) + sorted(f2e):
        if e not in aligned_e and f not in aligned_f:
            links.add((e, f)), aligned_e.add(e), aligned_f.add(f)
    return links


def translation_probs(english_ids, foreign_ids, iterations=5):
    """p(e | f) as sparse tensors (f_idx, e_idx, prob), plus statistics: IBM1 both ways, Viterbi links symmetrised per
    sentence, then p(e | f) = n(f ~ e) / sum_e' n(f ~ e') (RAMEN's get_prob_para.py: the same with fast_align)."""
    _, fwd = ibm1(english_ids, foreign_ids, iterations)        # links (e position, f position)
    _, rev = ibm1(foreign_ids, english_ids, iterations)        # links (f position, e position)
    counts = Counter((f_ids[j], e_ids[i]) for e_ids, f_ids, a, b in zip(english_ids, foreign_ids, fwd, rev)
                     for i, j in grow_diag_final_and(a, {(i, j) for j, i in b}))
    if not counts:
        raise XltError("word alignment produced no links: is the bitext really parallel?")
    f_idx, e_idx = (torch.tensor(x) for x in zip(*counts.keys()))
    n = torch.tensor(list(counts.values()), dtype=torch.float32)
    total = torch.zeros(int(f_idx.max()) + 1).index_add_(0, f_idx, n)
    return (f_idx, e_idx, n / total[f_idx]), {"links": sum(counts.values()), "pairs": len(counts)}


def alignment(bitext, eng_tok, foreign_tok, args):
    """p(e | f) of the bitext's subwords (translation_probs), with statistics: links, (f, e) pairs, and how
    many foreign tokens (and what percentage of the foreign vocabulary) get a translation."""
    en_ids = data.content_ids(eng_tok, [e for e, _ in bitext], args.max_len)
    fx_ids = data.content_ids(foreign_tok, [f for _, f in bitext], args.max_len)
    probs, stats = translation_probs(en_ids, fx_ids, args.ibm_iterations)
    covered = len(torch.unique(probs[0]))
    stats.update(covered=covered, coverage=round(100 * covered / foreign_tok.get_vocab_size(), 1))
    print(f"[transfer] alignment: {stats}")
    return probs, stats


# -------------------- 4. RAMEN's initialisation, and swapping vocabularies on the one shared encoder ----

def ramen_init(E_e, b_e, probs, specials, V_f, generator):
    """(E_f, b_f) as RAMEN's utils/init_weight.py (guess): N(0, 1/H) rows and bias 0; then the English row and
    bias for the special tokens; then E_f[i] = sum_j p(e_j | f_i) E_e[j] and b_f[i] = sum_j p(e_j | f_i) b_e[j]
    for every foreign token with a translation, a special one included (the foreign [UNK] when it is linked).
    probs=None gives the random baseline."""
    E_e, b_e, H = E_e.detach().float().cpu(), b_e.detach().float().cpu(), E_e.shape[1]
    E_f, b_f = torch.randn(V_f, H, generator=generator) * H ** -0.5, torch.zeros(V_f)
    for f, e in specials:
        E_f[f], b_f[f] = E_e[e], b_e[e]
    if probs is not None:
        # guess() also skips foreign id 0 (`if not tgt_tokenizer.token_to_id(t)`, meant for pieces missing from the
        # vocabulary): there id 0 is BERT's [PAD]. We do not: in BERT's and XLM-R's vocabularies our id 0 is a special
        # token too ([PAD], <s>: train_foreign_tokenizer keeps English ids), and data.content_ids gives the aligner
        # no special token but [UNK], so id 0 has no translation to skip.
        f_idx, e_idx, p = probs
        covered = torch.unique(f_idx)
        E_f[covered], b_f[covered] = 0.0, 0.0
        E_f.index_add_(0, f_idx, p[:, None] * E_e[e_idx])
        b_f.index_add_(0, f_idx, p * b_e[e_idx])
    return E_f, b_f


class Vocab(nn.Module):
    """A language's own tensors: its word embeddings (nn.Embedding; the MLM decoder is tied to them) and its
    MLM output bias (nn.Parameter). Everything else is shared. Vocab.of(enc): the one in `enc` now."""

    def __init__(self, word, bias):
        super().__init__()
        self.word, self.bias = word, bias

    @classmethod
    def new(cls, weight, bias):
        return cls(nn.Embedding.from_pretrained(weight, freeze=False), nn.Parameter(bias.clone()))

    @classmethod
    def of(cls, enc):
        return cls(enc.embed.word, enc.mlm.bias)


def use_vocab(enc, vocab):
    """Swap a language's embeddings (and MLM bias) into the encoder; every other tensor stays as it is.
    The MLM decoder follows automatically: model.py ties it to enc.embed.word.weight."""
    enc.embed.word = vocab.word
    if enc.mlm is not None:
        enc.mlm.bias = vocab.bias
    enc.config = dataclasses.replace(enc.config, vocab_size=vocab.word.num_embeddings)


# -------------------- 5. Masked language modelling: the loop of Stages A and B ------------------------

def mlm_batches(examples, tok, batch_size, seed):
    """Endless masked-LM batches over `examples` (data.encode output): length-bucketed, reshuffled every
    epoch, masked by data.mlm_batch (BERT's 80/10/10; keys positions/targets) from a generator seeded `seed`."""
    ids, generator = data.special_ids(tok), torch.Generator().manual_seed(seed)
    lengths = [len(e["input_ids"]) for e in examples]
    for epoch in itertools.count():
        for idx in data.bucket_batches(lengths, batch_size, seed, epoch):
            yield data.mlm_batch([examples[i] for i in idx], ids, tok.get_vocab_size(), generator)


def train_mlm(enc, streams, steps, lr, args, device, desc):
    """streams = [(vocab, batches)]; each step runs one batch of every stream through the shared encoder with
    its vocabulary swapped in, sums the losses (Stage B: English + foreign, as ramen.py adds their gradients)
    and takes one AdamW step on whatever requires grad. Returns the mean loss per stream of each log window."""
    opt = model.configure_optimizer([enc] + [v for v, _ in streams], lr, args.weight_decay)
    log, losses = model.LossLog(args.log_every, steps, desc, opt), []
    enc.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        model.set_lr(opt, model.lr_schedule(step, steps, int(args.warmup * steps)))
        loss = 0.0
        for vocab, batches in streams:
            use_vocab(enc, vocab)
            with model.autocast(device):
                loss = loss + model.mlm_loss(enc, data.to_device(next(batches), device))[0]
        loss.backward()
        model.optimizer_step(opt)
        if (mean := log.add(loss)) is not None:
            losses.append(mean[0] / len(streams))             # per stream: comparable across stages
            tqdm.write(f"[{desc}] step {step + 1}/{steps}  MLM loss {losses[-1]:.3f}")
    log.finish()
    return losses


def stage_a(enc, vocab_e, vocab_f, batches_f, args, device, desc="stage A", steps=None):
    """Stage A (ours): foreign MLM; only E_f and b_f learn (the encoder, MLM transform and E_e are frozen).
    steps: default --stage_a_steps."""
    for m, learns in ((enc, False), (vocab_e, False), (vocab_f, True)):   # in this order: enc holds a vocab
        m.requires_grad_(learns)
    return train_mlm(enc, [(vocab_f, batches_f)], steps or args.stage_a_steps, args.stage_a_lr, args, device, desc)


def last_quarter_drop(losses):
    """How far a logged MLM loss curve still fell over its last quarter, in % of the loss there (None for
    fewer than 4 points): near 0 means it has levelled off, a few % or more that it has not."""
    if len(losses) < 4:
        return None
    start = losses[-1 - len(losses) // 4]
    return round(100 * (start - losses[-1]) / start, 2)


def stage_b(enc, vocab_e, vocab_f, batches_e, batches_f, args, device, desc="stage B"):
    """Stage B (ramen.py's loop): everything learns from one English and one foreign MLM batch per update."""
    for m in (enc, vocab_e, vocab_f):
        m.requires_grad_(True)
    return train_mlm(enc, [(vocab_e, batches_e), (vocab_f, batches_f)], args.stage_b_steps, args.stage_b_lr,
                     args, device, desc)


# -------------------- 6. The experiment: the recipe per target language and seed ----------------------

def english_model(args, mono_e, eng_tok, seed, device):
    """The English encoder with an MLM head; Stage 0 (ours) for a checkpoint without one (MiniLM): model.fit_mlm_head
    on stored states of the frozen encoder (one masked pass over the English text) for --mlm_head_steps steps."""
    model.set_seed(seed)                                          # the fresh head's initialisation
    base = model.Encoder.from_pretrained(args.model, mlm_head=True, dropout=args.dropout).to(device)
    evaluate.check_max_len(args.max_len, base, args.model)
    if base.checkpoint_has_mlm_head or not args.mlm_head_steps:
        return base, {}
    one_pass = itertools.islice(mlm_batches(mono_e, eng_tok, args.batch_size, seed), -(-len(mono_e) // args.batch_size))
    return base, {"stage_0": model.fit_mlm_head(base, one_pass, args.mlm_head_steps, args.mlm_head_lr, device,
                                                generator=torch.Generator().manual_seed(seed))}


def transfer(base, eng_tok, foreign_tok, probs, mono_f, mono_e, args, device, seed, init, save_to=None):
    """On a copy of `base`: E_f initialised ('ramen': from p(e | f); 'random': without), Stage A, Stage B;
    saved to save_to. Returns (the encoder with E_f swapped in, English Vocab, foreign Vocab, MLM losses)."""
    enc = copy.deepcopy(base)
    if args.compile:
        model.compile_blocks(enc)
    vocab_e, e, f = Vocab.of(enc), data.special_ids(eng_tok), data.special_ids(foreign_tok)
    model.set_seed(seed)                                     # specials: [(foreign id, English id)], copied across
    E_f, b_f = ramen_init(vocab_e.word.weight, vocab_e.bias, probs if init == "ramen" else None,
                          [(f[r], e[r]) for r in e], foreign_tok.get_vocab_size(), torch.Generator().manual_seed(seed))
    vocab_f = Vocab.new(E_f, b_f).to(device)
    batches_f = mlm_batches(mono_f, foreign_tok, args.batch_size, seed)
    batches_e = mlm_batches(mono_e, eng_tok, args.batch_size, seed + 1)
    steps_a = args.random_stage_a_steps if init == "random" else None      # None: --stage_a_steps
    losses = {"stage_a": stage_a(enc, vocab_e, vocab_f, batches_f, args, device, f"{init} stage A", steps_a),
              "stage_b": stage_b(enc, vocab_e, vocab_f, batches_e, batches_f, args, device, f"{init} stage B")}
    losses["last_quarter_drop_%"] = drop = {stage: last_quarter_drop(losses[stage]) for stage in ("stage_a", "stage_b")}
    print(f"[transfer] {init} init: the MLM loss fell {drop} % over the last quarter of each stage "
          "(near 0: levelled off)")
    use_vocab(enc, vocab_f)
    if save_to:
        model.save_pretrained(enc, save_to, tokenizer=foreign_tok, extra=dict(
            xlt_prefix=evaluate.resolve_prefix(args.prefix, args.model), xlt_transfer={"english_model": args.model}))
    return enc, vocab_e, vocab_f, losses


def main(argv=None):
    args, langs = parse_args(argv)
    run = evaluate.RunFolder(args, "transfer.py")                  # checked and locked before anything else
    t0, device, eng_tok = time.time(), model.pick_device(args.device), data.load_tokenizer(args.model)
    prefix = evaluate.resolve_prefix(args.prefix, args.model)                      # the English model's input prefix
    test = dict(data_dir=args.data_dir, device=device, max_len=args.max_len, limit=args.eval_limit)  # SIB-200 test sets
    task = (data.subset(data.read_sib200(args.data_dir, "eng_Latn", "train"), args.limit),  # English SIB-200
            data.subset(data.read_sib200(args.data_dir, "eng_Latn", "dev"), args.eval_limit))
    inits = (("ramen", "RAMEN init"), ("random", "random init"))
    baselines = [("English model, no transfer", args.model, "english"),
                 (f"{args.reference} (reference)", args.reference, "reference")]
    # The units: per target language and seed each initialisation (its stages, fine-tune and scores), then per
    # seed each baseline row. Every table cell and detail is rebuilt from the finished units' records.
    run.plan = [f"{lang}-seed{seed}-{init}" for lang in langs for seed in args.seeds for init, _ in inits] + [
        f"seed{seed}-{slug}" for seed in args.seeds for *_, slug in baselines]
    records, result = {}, None
    # the key differences, per target language (and their zero-shot avg): RAMEN's init against a random one, and
    # against not transferring at all
    tests = [(lang, [lang]) for lang in langs] + ([("zero-shot avg", langs)] if len(langs) > 1 else [])
    differences = [("RAMEN init", b, name, sets) for b in ("random init", baselines[0][0]) for name, sets in tests]

    def publish(unit, record):                      # results.json and .md after every finished unit
        nonlocal result
        records[unit] = record
        per_seed, details, outcomes = {}, {"corpora": {}, "alignment": {}, "runs": {}}, {}
        for seed in args.seeds:
            for init, row in inits:                 # eng_Latn: the mean over the target languages done so far
                done = [records[u] for lang in langs if (u := f"{lang}-seed{seed}-{init}") in records]
                if done:
                    cell = per_seed.setdefault(seed, {})[row] = {"eng_Latn": 0.0}
                    for r in done:
                        cell["eng_Latn"], cell[r["lang"]] = cell["eng_Latn"] + r["eng"] / len(done), r["score"]
                        details["corpora"][r["lang"]], details["alignment"][r["lang"]] = r["corpora"], r["alignment"]
                        details["runs"].setdefault(f"{r['lang']}, seed {seed}", {}).update(r["run"])
                        outcomes.setdefault(row, {}).setdefault(seed, {}).update(r.get("outcomes", {}))
        for seed in args.seeds:
            for row, _, slug in baselines:
                if (r := records.get(f"seed{seed}-{slug}")):
                    per_seed.setdefault(seed, {})[row], details["runs"][f"{row}, seed {seed}"] = r["scores"], r["run"]
                    outcomes.setdefault(row, {})[seed] = r.get("outcomes", {})
        per_seed = {s: {r: evaluate.with_averages(v, "eng_Latn") for r, v in rows.items()}
                    for s, rows in per_seed.items()}
        mean, std = evaluate.mean_std(per_seed)
        tables = [f"SIB-200 test accuracy (%), fine-tuned on English only ({args.model}); {', '.join(langs)} "
                  f"zero-shot; mean ± std over seeds {args.seeds}\n\n"
                  + evaluate.markdown_table(mean, "eng_Latn", std=std, averages=False)]
        paper = ("Tran (2020), From English To Foreign Languages: Transferring Pre-trained Language Models, "
                 "arXiv:2002.07306")
        result = evaluate.write_results(args, "transfer.py", paper, per_seed, tables, details, device, t0, run,
                                        evaluate.compare(outcomes, differences))

    for lang in langs:
        units = {u: run.done(u) for u in [f"{lang}-seed{seed}-{init}" for seed in args.seeds for init, _ in inits]}
        if all(units.values()):                     # nothing to train for this language: no corpora either
            for unit, record in units.items():
                publish(unit, record)
            continue
        bitext, foreign, english, sources = corpora(args, lang)                            # the corpora
        kept = run.units / f"{lang}.tokenizer"            # the trainer breaks ties in hash order, per process:
        if kept.is_file():                                   # a resumed run must have the same vocabulary
            foreign_tok = Tokenizer.from_file(str(kept))
        else:
            foreign_tok = train_foreign_tokenizer(foreign, args.vocab_size, eng_tok)       # a foreign vocabulary
            with model.atomic_file(kept, "w") as f:
                f.write(foreign_tok.to_str())
        probs, alignment_info = alignment(bitext, eng_tok, foreign_tok, args)             # p(e | f)
        corpora_info = dict(sources=sources, bitext_pairs=len(bitext), foreign_sentences=len(foreign),
                            english_sentences=len(english), foreign_vocab_size=foreign_tok.get_vocab_size(),
                            sib200_in_bitext="SIB-200 train+dev (index_id)" in sources)
        mono_f, mono_e = data.encode(foreign_tok, foreign, args.max_len), data.encode(eng_tok, english, args.max_len)
        for seed in args.seeds:
            if all(units[f"{lang}-seed{seed}-{init}"] for init, _ in inits):
                for init, _ in inits:
                    publish(f"{lang}-seed{seed}-{init}", units[f"{lang}-seed{seed}-{init}"])
                continue
            base, stage_0 = english_model(args, mono_e, eng_tok, seed, device)            # Stage 0 (ours)
            if not args.no_save and seed == args.seeds[0]:
                run.need(base, base)
            for init, row in inits:
                unit = f"{lang}-seed{seed}-{init}"
                if units[unit] is None:
                    t, save = time.time(), not args.no_save and seed == args.seeds[0] and init == "ramen"
                    enc, vocab_e, vocab_f, losses = transfer(base, eng_tok, foreign_tok, probs, mono_f, mono_e, args,
                                                             device, seed, init, save and f"{args.out_dir}/{lang}")
                    use_vocab(enc, vocab_e)                                                # English fine-tune
                    enc.embed.word.requires_grad_(False)               # E_f was fitted to the E_e the encoder saw
                    enc.mlm.requires_grad_(False)
                    head, log = evaluate.finetune(enc, eng_tok, *task, args, device, seed, prefix,
                                                  desc=f"{init} {lang}")
                    eng = evaluate.sib200_scores(enc, head, eng_tok, langs=["eng_Latn"], prefix=prefix,
                                                 **test)["eng_Latn"]
                    use_vocab(enc, vocab_f)                                                # the swap: zero-shot
                    score, tested = evaluate.sib200_scores(enc, head, foreign_tok, langs=[lang], prefix=prefix,
                                                           outcomes=True, **test)
                    if save:                                               # the classifier needs no MLM head
                        enc.mlm = None
                        model.save_pretrained(enc, f"{args.out_dir}/{lang}-classifier", foreign_tok, head, {
                            "xlt_prefix": prefix, "xlt_transfer": {"english_model": args.model, "lang": lang}})
                    units[unit] = run.finish(unit, {
                        "lang": lang, "eng": eng, "score": score[lang], "outcomes": tested, "corpora": corpora_info,
                        "alignment": alignment_info,
                        "run": {**stage_0, init: losses, f"{init} fine-tune": {**log, "eng_Latn": eng,
                                                                               "seconds": round(time.time() - t, 1)}}})
                publish(unit, units[unit])
    for seed in args.seeds:                        # the rows without a new vocabulary, all languages at once
        for row, ckpt, slug in baselines:
            if (record := run.done(f"seed{seed}-{slug}")) is None:
                t, enc = time.time(), model.Encoder.from_pretrained(ckpt, dropout=args.dropout).to(device)
                evaluate.check_max_len(args.max_len, enc, ckpt)
                if args.compile:
                    model.compile_blocks(enc)
                tok, pre = data.load_tokenizer(ckpt), evaluate.resolve_prefix(args.prefix, ckpt)
                enc.embed.word.weight.requires_grad_(args.train_embeddings)       # (never for the RAMEN rows)
                head, log = evaluate.finetune(enc, tok, *task, args, device, seed, pre, desc=row)
                scores, tested = evaluate.sib200_scores(enc, head, tok, langs=["eng_Latn", *langs], prefix=pre,
                                                        outcomes=True, **test)
                record = run.finish(f"seed{seed}-{slug}", {"scores": scores, "outcomes": tested, "run": {
                    **log, "prefix": pre, "seconds": round(time.time() - t, 1)}})
            publish(f"seed{seed}-{slug}", record)
    return result


def parse_args(argv):
    p = evaluate.add_common_args(
        evaluate.parser(__doc__), out_dir="out/transfer", epochs=2, batch_size=32, lr=2e-4, log_every=25, seeds=(0,),
        langs_help="target languages, comma-separated SIB-200 (FLORES-200) codes (default: deu_Latn)",
        limit_help="use N rows, evenly spaced, of the bitext, of the extra foreign text and of English SIB-200 train")
    add, steps, lr, path = p.add_argument, evaluate.nonneg_int, evaluate.positive_float, evaluate.nonempty
    add("--model", type=path, default="sentence-transformers/all-MiniLM-L6-v2", help="the English checkpoint")
    add("--reference", type=path, default="intfloat/multilingual-e5-small", help="a multilingual checkpoint to compare")
    add("--mono", type=path, help="foreign text, one sentence per line (replaces the built-in extra foreign text)")
    add("--parallel", type=path, help="bitext, English<TAB>foreign per line (replaces the built-in bitext)")
    add("--no_sib_bitext", action="store_true", help="leave SIB-200 (the translations of the English fine-tuning "
        "sentences) out of the built-in bitext and foreign text")
    add("--vocab_size", type=evaluate.positive_int, default=8000, help="foreign WordPiece vocabulary size")
    add("--ibm_iterations", type=evaluate.positive_int, default=5, help="EM iterations of IBM Model 1")
    add("--mlm_head_steps", type=steps, default=200, help="Stage 0 steps, 64 masked tokens each (only "
        "for a checkpoint without an MLM head; 0 skips Stage 0)")
    add("--mlm_head_lr", type=lr, default=1e-3, help="Stage 0 learning rate")
    add("--stage_a_steps", type=steps, default=150, help="Stage A: foreign embeddings only")
    add("--random_stage_a_steps", type=evaluate.positive_int, default=None, help="Stage A steps of the random "
        "baseline alone (default: --stage_a_steps), so that its MLM loss can level off: see last_quarter_drop_%%")
    add("--stage_a_lr", type=lr, default=3e-4, help="Stage A peak learning rate")
    add("--stage_b_steps", type=steps, default=40, help="Stage B: joint English + foreign MLM")
    add("--stage_b_lr", type=lr, default=1e-4, help="Stage B peak learning rate")
    args = evaluate.parse(p, argv)
    args.data_dir = str(data.resolve_data_dir(args.data_dir))
    langs = evaluate.resolve_langs(args.langs, "sib200", args.data_dir, default=["deu_Latn"])
    langs = [lang for lang in langs if lang != "eng_Latn"] if args.langs == "all" else langs
    if "eng_Latn" in langs:
        raise XltError("--langs: eng_Latn is the source language; name foreign languages (deu_Latn, ...)")
    if args.parallel and args.no_sib_bitext:
        raise XltError("--no_sib_bitext leaves SIB-200 out of the built-in bitext, which --parallel replaces")
    if (args.parallel or args.mono) and len(langs) > 1:
        raise XltError(f"--parallel/--mono hold one language's text, but --langs names {len(langs)} languages")
    return args, langs


if __name__ == "__main__":
    evaluate.cli(main)
