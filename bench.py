"""bench.py: how fast model.py's encoder trains and infers, against transformers' BERT, in one process.

    python bench.py                                    # e5-small and BERT-base shapes, batch 32, length 128
    python bench.py --device cuda --dtype bf16 --configs bert-base
    python bench.py --no_reference --json out/bench.json

What it does, for each config (an architecture shape with random weights, no download needed):
  1. Builds model.py's Encoder, saves it with save_pretrained, loads that directory with
     transformers.AutoModel (attn_implementation="sdpa", no pooler), so both hold identical weights,
     and prints the largest output difference (eval mode, same batch) before timing anything.
  2. Times the training step of both: forward, loss, backward, AdamW step, zero_grad. Same batch
     (random ids, full length; --padding pads the tail of half the rows), same loss (mean square of
     the last hidden state), same optimizer (model.configure_optimizer: fused AdamW on CPU and
     CUDA, weight decay on matrices only) over the same parameters, both in train mode with the same
     dropout (--dropout, BERT's 0.1 by default). Then inference (eval mode, inference_mode, forward only).
     By default the step runs under bf16 autocast on CUDA and in fp32 on CPU, as model.autocast does in
     every script (--dtype to choose).
  3. Interleaves: every round times ours, theirs (alternating which goes first) and one large matmul,
     after --warmup rounds; the figure reported is the median over --repeats rounds. A shared or
     throttling machine slows all three alike, so the ratio and the fraction of peak stay honest even
     when the absolute numbers drift.
  4. Reports achieved FLOP/s (formula in step_flops) against the matmul peak measured in those same
     rounds, and on CUDA the MFU against the card's datasheet dense bf16 peak (--peak_tflops to set).
  5. Breaks the step down into forward / backward / optimizer, and measures our optimizer step with the
     word-embedding matrix trainable vs frozen, plus the dense word-embedding gradient that backward
     has to build when it is trainable: the reason the scripts freeze it while fine-tuning. The same
     step with AdamW's other implementation (fused vs foreach) is timed beside it.

transformers is only the reference here (pip install transformers to compare); --no_reference times
ours alone.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

# OpenMP threads that wait by spinning (libgomp's default) lose badly when the CPU is shared: a thread
# spins on a barrier while the one it waits for is descheduled. Measured on this project's 2-core runner
# under load: the AdamW step of the e5-small shape took 2.7-8.6 s spinning, 1.3 s passive. Set before
# torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins (the header prints which ran).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import model as M  # noqa: E402

# Architecture shapes (Hugging Face config names). e5-small: intfloat/multilingual-e5-small, a BertModel
# with XLM-R's 250k-piece vocabulary; bert-base: bert-base-uncased; mbert-base: bert-base-multilingual-cased.
SHAPES = {
    "e5-small": dict(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=1536),
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "mbert-base": dict(vocab_size=119547, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=128),
}

# Datasheet dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched against torch.cuda.get_device_name
# in this order (first match wins, so the specific names come before the generic ones).
# None: a name we know but whose number we would only be guessing (MFU then needs --peak_tflops).
CARD_PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
              ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
              ("A10G", None), ("A10", 125.0), ("A6000", 155.0)]

EMBEDDING_TABLES = ("embed.word.weight", "embed.position.weight", "embed.token_type.weight")


# ----------------------------------------------------------------------------------------------------
# FLOP accounting
# ----------------------------------------------------------------------------------------------------

def non_embedding_params(encoder):
    """Parameters of everything but the three embedding tables (word, position, token type): the N of
    the 6N rule. The embedding LayerNorm counts (it is 2H numbers); an embedding lookup is no matmul."""
    return sum(p.numel() for n, p in encoder.named_parameters() if n not in EMBEDDING_TABLES)


def step_flops(n_nonembed, layers, hidden, batch, seq):
    """FLOPs of one training step on `batch` full sequences of length `seq`.

    Dense part: every non-embedding weight does one multiply-add per token forward (2N FLOPs/token) and
    two backward (gradient w.r.t. the input and w.r.t. the weight: 4N), so 6 * N * tokens.
    Attention part, which has no weights: per layer and sequence, QK^T is a (T x d) @ (d x T) product
    per head, T*T*d multiply-adds, so over the heads T^2 * H multiply-adds = 2 T^2 H FLOPs; AV is
    the same again: 4 T^2 H forward. Backward is twice forward, so 12 * L * T^2 * H per sequence.
    Softmax, LayerNorm, GELU and the optimizer are not counted (the usual convention; they are memory-bound).
    """
    tokens = batch * seq
    return 6 * n_nonembed * tokens + 12 * layers * batch * seq * seq * hidden


def inference_flops(n_nonembed, layers, hidden, batch, seq):
    """Forward only: 2 * N * tokens + 4 * L * T^2 * H per sequence (see step_flops)."""
    return 2 * n_nonembed * batch * seq + 4 * layers * batch * seq * seq * hidden


# ----------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------

def amp(device, dtype):
    """The compute dtype as an autocast context. bf16 is what model.autocast gives on CUDA (the scripts'
    default there); fp32 what it gives on CPU. Either can be asked for on either device."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device):
    _sync(device)
    return time.perf_counter()


def card_peak_tflops(name):
    for key, tflops in CARD_PEAKS:
        if key.lower() in name.lower():
            return tflops
    return None


class Peak:
    """A large square matmul in the step's compute dtype: the machine's attainable matmul FLOP/s."""

    def __init__(self, device, dtype, size):
        self.device, self.size = device, size
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.inner = 10 if device.type == "cuda" else 1      # a GPU matmul is too short to time alone
        self.times = []

    def run(self, record=True):
        t0 = _clock(self.device)
        for _ in range(self.inner):
            torch.mm(self.a, self.b)
        dt = (_clock(self.device) - t0) / self.inner
        if record:
            self.times.append(dt)
        return dt

    def tflops(self):
        return 2 * self.size ** 3 / statistics.median(self.times) / 1e12


# ----------------------------------------------------------------------------------------------------
# The two models
# ----------------------------------------------------------------------------------------------------

def import_transformers():
    try:
        import transformers
    except ImportError:
        raise M.XltError("transformers is not installed: pip install transformers to compare "
                         "(or pass --no_reference to time model.py's encoder alone)") from None
    return transformers


def build_models(config, device, reference, seed):
    """(ours, theirs or None): model.py's Encoder with random weights, and transformers' model loaded from
    the directory our save_pretrained wrote, so the weights are identical by construction."""
    torch.manual_seed(seed)
    ours = M.Encoder(config)
    theirs = None
    if reference:
        transformers = import_transformers()
        with tempfile.TemporaryDirectory(prefix="xlt-bench-") as tmp:
            ours.save_pretrained(os.path.join(tmp, "model"))
            prev = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            if hasattr(transformers.utils.logging, "disable_progress_bar"):
                transformers.utils.logging.disable_progress_bar()
            try:
                theirs = transformers.AutoModel.from_pretrained(
                    os.path.join(tmp, "model"), attn_implementation="sdpa", add_pooling_layer=False)
            finally:
                transformers.logging.set_verbosity(prev)
        theirs.float().to(device)
    return ours.to(device), theirs


class Runner:
    """One model with its optimizer, and a uniform forward(input_ids, attention_mask) -> (B, T, H)."""

    def __init__(self, name, module, forward, device, dtype, compile_):
        self.name, self.module, self.device, self.dtype = name, module, device, dtype
        self.forward = torch.compile(forward) if compile_ else forward
        self.opt = M.configure_optimizer([module], lr=1e-5, weight_decay=0.01)
        self.times = {"train": [], "infer": []}       # wall clock, seconds
        self.cpu = {"train": [], "infer": []}         # this process's CPU time (all threads), seconds
        self.phases = {"forward": [], "backward": [], "optimizer": []}

    def train_step(self, batch, split):
        """One step: (wall seconds, CPU seconds, (forward, backward, optimizer) seconds or None). With
        split, the clock is read (and on CUDA the stream synchronised) between the phases; without,
        only around the whole step, which is then free of host synchronisation."""
        dev = self.device
        t0 = _clock(dev)
        c0 = time.process_time()
        with amp(dev, self.dtype):
            h = self.forward(batch["input_ids"], batch["attention_mask"])
            loss = h.float().pow(2).mean()
        t1 = _clock(dev) if split else None
        loss.backward()
        t2 = _clock(dev) if split else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = _clock(dev)
        return t3 - t0, time.process_time() - c0, ((t1 - t0, t2 - t1, t3 - t2) if split else None)

    def step_untimed(self, batch):
        """The same step with no clock reads: what count_host_syncs watches."""
        with amp(self.device, self.dtype):
            loss = self.forward(batch["input_ids"], batch["attention_mask"]).float().pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def infer(self, batch):
        dev = self.device
        self.module.eval()
        try:
            t0 = _clock(dev)
            c0 = time.process_time()
            with torch.inference_mode(), amp(dev, self.dtype):
                self.forward(batch["input_ids"], batch["attention_mask"])
            return _clock(dev) - t0, time.process_time() - c0
        finally:
            self.module.train()


def make_batch(config, batch_size, seq_len, padding, device, seed):
    """Random token ids (no special-token structure needed for timing) and an attention mask. With
    padding > 0 the odd rows have their last padding*seq_len positions padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    n_pad = int(round(padding * seq_len))
    if n_pad:
        mask[1::2, seq_len - n_pad:] = 0
        ids[mask == 0] = config.pad_token_id
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def max_abs_diff(ours, theirs, batch, device, dtype):
    ours.eval()
    theirs.eval()
    try:
        with amp(device, dtype):
            a = ours(batch["input_ids"], batch["attention_mask"]).float()
            b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.float()
        return (a - b).abs().max().item()
    finally:
        ours.train()
        theirs.train()


@contextlib.contextmanager
def count_host_syncs(device, counter):
    """On CUDA, count the operations that make the host wait for the GPU (torch's sync debug mode)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        counter.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------
# One config
# ----------------------------------------------------------------------------------------------------

def bench_config(name, args, device, log):
    shape = dict(SHAPES[name])
    config = M.Config(model_type="bert", hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
                      **shape)
    if args.seq_len > config.max_position_embeddings:
        raise M.XltError(f"--seq_len {args.seq_len} exceeds the {name} shape's {config.max_position_embeddings} positions")
    ours, theirs = build_models(config, device, not args.no_reference, args.seed)
    if args.freeze_word_embeddings:
        ours.embed.word.weight.requires_grad_(False)
        if theirs is not None:
            theirs.get_input_embeddings().weight.requires_grad_(False)
    compute_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch = make_batch(config, args.batch_size, args.seq_len, args.padding, device, args.seed)

    res = {"config": name, "shape": shape, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "padding": args.padding, "dropout": args.dropout}
    if theirs is not None:
        res["max_abs_diff"] = max_abs_diff(ours, theirs, batch, device, args.dtype)
        log(f"[{name}] outputs of ours and transformers' on the same batch (eval): max |diff| = {res['max_abs_diff']:.2e}")

    runners = [Runner("ours", ours, ours, device, args.dtype, args.compile)]
    if theirs is not None:
        runners.append(Runner("transformers", theirs,
                              lambda i, m: theirs(input_ids=i, attention_mask=m).last_hidden_state,
                              device, args.dtype, args.compile))
    ours.train()
    if theirs is not None:
        theirs.train()
    peak = Peak(device, compute_dtype, args.peak_size)
    split = device.type != "cuda"          # on CPU reading the clock between phases costs nothing
    rounds = args.warmup + args.repeats
    t_start = time.perf_counter()
    for r in range(rounds):
        record = r >= args.warmup
        order = runners if r % 2 == 0 else runners[::-1]
        for run in order:
            dt, cpu, phases = run.train_step(batch, split)
            if record:
                run.times["train"].append(dt)
                run.cpu["train"].append(cpu)
                if phases:
                    for k, v in zip(("forward", "backward", "optimizer"), phases):
                        run.phases[k].append(v)
        for run in order:
            dt, cpu = run.infer(batch)
            if record:
                run.times["infer"].append(dt)
                run.cpu["infer"].append(cpu)
        peak.run(record=record)
        steps = (", ".join(f"{run.name} step {run.times['train'][-1] * 1e3:.0f} ms" for run in runners)
                 if record else "warm-up")
        log(f"[{name}] round {r + 1}/{rounds}: {steps} ({time.perf_counter() - t_start:.0f} s)")

    if device.type == "cuda":
        # The phase breakdown needs a synchronisation between phases: separate steps, not the timed ones.
        for r in range(args.repeats + 1):
            for run in runners:
                _, _, phases = run.train_step(batch, True)
                if r:
                    for k, v in zip(("forward", "backward", "optimizer"), phases):
                        run.phases[k].append(v)
        for run in runners:
            counter = []
            _sync(device)
            with count_host_syncs(device, counter):
                run.step_untimed(batch)
            _sync(device)
            res.setdefault("host_syncs_per_step", {})[run.name] = counter[0]

    n_ne = non_embedding_params(ours)
    L, H, B, T = config.num_hidden_layers, config.hidden_size, args.batch_size, args.seq_len
    flops = {"train": step_flops(n_ne, L, H, B, T), "infer": inference_flops(n_ne, L, H, B, T)}
    peak_tflops = peak.tflops()
    res.update(non_embedding_params=n_ne, total_params=sum(p.numel() for p in ours.parameters()),
               flops=flops, measured_peak_tflops=peak_tflops)
    for run in runners:
        out = res.setdefault(run.name, {})
        for kind, times in run.times.items():
            ms = statistics.median(times) * 1e3
            tflops = flops[kind] / (ms / 1e3) / 1e12
            out[kind] = {"ms": ms, "all_ms": [t * 1e3 for t in times], "tflops": tflops,
                         "fraction_of_measured_peak": tflops / peak_tflops,
                         "cpu_ms": statistics.median(run.cpu[kind]) * 1e3}
            if args.peak_tflops:
                out[kind]["mfu"] = tflops / args.peak_tflops
        out["phases_ms"] = {k: statistics.median(v) * 1e3 for k, v in run.phases.items()}
    a = b = None
    if theirs is not None:
        # speedup = transformers' time / ours. Each round timed the two back to back, so the ratio within
        # a round cancels whatever the machine's load did between rounds: the median of those paired
        # ratios is the headline. The ratio of the medians, and of the CPU time the process spent (on a
        # shared CPU, less sensitive to being descheduled), are kept beside it.
        a, b = runners
        res["speedup"] = {k: statistics.median(t / o for o, t in zip(a.times[k], b.times[k])) for k in a.times}
        res["speedup_of_medians"] = {k: res["transformers"][k]["ms"] / res["ours"][k]["ms"] for k in a.times}
        res["speedup_cpu_time"] = {k: statistics.median(t / o for o, t in zip(a.cpu[k], b.cpu[k]) if o > 0)
                                   for k in a.cpu}
    # The breakdown needs only our model: free the reference model and its optimizer state first.
    ours_run = runners[0]
    del runners, theirs, a, b
    release_memory(device)
    res["optimizer"] = optimizer_breakdown(ours_run, batch, args, device)
    del ours_run, ours
    release_memory(device)
    return res


def release_memory(device):
    """Give freed memory back between configs: the garbage collector, then glibc's free lists (without
    malloc_trim a process that held the e5-small pair keeps that memory while it times BERT-base), and
    the CUDA caching allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_rss_gb():
    """The most resident memory this process has held, in GB (Linux reports kB, macOS bytes)."""
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1e9 if sys.platform == "darwin" else 1e6)


def optimizer_breakdown(run, batch, args, device):
    """The optimizer step over all parameters vs with the word embeddings frozen (the scripts' default
    when fine-tuning), and the dense word-embedding gradient that backward builds when they are trainable."""
    enc = run.module
    word = enc.embed.word.weight
    was_trainable = word.requires_grad
    run.opt = None                                         # free the timed optimizer's state first
    word.requires_grad_(False)
    frozen = M.configure_optimizer([enc], lr=1e-5, weight_decay=0.01)
    word.requires_grad_(True)
    trainable = M.configure_optimizer([enc], lr=1e-5, weight_decay=0.01)
    enc.zero_grad(set_to_none=True)
    with amp(device, args.dtype):
        loss = run.forward(batch["input_ids"], batch["attention_mask"]).float().pow(2).mean()
    loss.backward()          # gradients for every parameter; both optimizers step on them, never zeroed
    trainable.step()         # optimizer state is created lazily, on the first step: not timed
    frozen.step()
    # The same step with AdamW's other multi-tensor implementation (fused <-> foreach), same groups.
    impl = "fused" if trainable.defaults.get("fused") else "foreach"
    alt_impl = "foreach" if impl == "fused" else "fused"
    try:
        alt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                 for g in trainable.param_groups], lr=1e-5, **{alt_impl: True})
        alt.step()
    except (RuntimeError, TypeError):        # e.g. no fused CPU kernel in this torch
        alt = None
    variants = [(trainable, []), (frozen, [])] + ([(alt, [])] if alt is not None else [])
    for r in range(args.repeats):
        for opt, times in variants[:: 1 if r % 2 == 0 else -1]:
            t0 = _clock(device)
            opt.step()
            times.append(_clock(device) - t0)
    # What backward does for a trainable nn.Embedding: a dense (V, H) gradient, zero-filled, then the
    # incoming gradients of every token summed into their rows.
    B, T, H = batch["input_ids"].shape + (enc.config.hidden_size,)
    g = torch.randn(B, T, H, device=device)
    t_grad = []
    for r in range(args.repeats + 1):
        t0 = _clock(device)
        torch.ops.aten.embedding_dense_backward(g, batch["input_ids"], enc.config.vocab_size, -1, False)
        if r:
            t_grad.append(_clock(device) - t0)
    enc.zero_grad(set_to_none=True)
    word.requires_grad_(was_trainable)
    ms = [statistics.median(times) * 1e3 for _, times in variants]
    del frozen, trainable, alt, variants
    n_word = word.numel()
    n_all = sum(p.numel() for p in enc.parameters())
    return {"all_params": n_all, "word_embedding_params": n_word,
            "impl": impl, "step_ms_trainable": ms[0], "step_ms_frozen": ms[1],
            "alt_impl": alt_impl, "alt_step_ms_trainable": ms[2] if len(ms) > 2 else None,
            "word_embedding_grad_ms": statistics.median(t_grad) * 1e3}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def _row(cells, widths):
    return "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"


def format_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [_row(r, widths) for r in rows])


def report(results, meta, args):
    out = []
    mfu = args.peak_tflops is not None
    cpu = meta["device"] == "cpu"
    header = ["config", "phase", "ours ms", "transformers ms", "speedup"] + (["speedup, CPU time"] if cpu else []) \
        + ["ours TFLOP/s", "% of measured peak"] + ([f"MFU (of {args.peak_tflops:g})"] if mfu else [])
    rows = []
    for r in results:
        for kind, label in (("train", "train step"), ("infer", "inference")):
            o = r["ours"][kind]
            t = r.get("transformers", {}).get(kind)
            row = [r["config"], label, f"{o['ms']:.1f}", f"{t['ms']:.1f}" if t else "-",
                   f"{r['speedup'][kind]:.2f}x" if t else "-"]
            if cpu:
                row.append(f"{r['speedup_cpu_time'][kind]:.2f}x" if t else "-")
            row += [f"{o['tflops']:.3f}", f"{100 * o['fraction_of_measured_peak']:.0f}%"]
            if mfu:
                row.append(f"{100 * o['mfu']:.1f}%")
            rows.append(row)
    out.append(format_table(header, rows))
    out.append(f"ms: medians of {args.repeats} rounds after {args.warmup} warm-up. speedup: transformers' time / "
               "ours (>= 1: model.py at least as fast), the median over rounds of the ratio of the two steps "
               "timed back to back in the same round" + ("; CPU time: the same with the CPU time this process "
               "used, which a shared CPU disturbs less than the wall clock." if cpu else "."))

    header = ["config", "model", "forward", "backward", "optimizer", "step"]
    rows = []
    for r in results:
        for name in ("ours", "transformers"):
            if name in r:
                p = r[name]["phases_ms"]
                rows.append([r["config"], name, f"{p['forward']:.1f}", f"{p['backward']:.1f}",
                             f"{p['optimizer']:.1f}", f"{r[name]['train']['ms']:.1f}"])
    out.append("\nWhere the training step's time goes (ms, medians; forward includes the loss):")
    out.append(format_table(header, rows))

    header = ["config", "params", "word emb.", "opt step, emb trainable", "opt step, emb frozen",
              "emb grad in backward", "saved by freezing", "share of trainable step", "other AdamW, emb trainable"]
    rows = []
    for r in results:
        o = r["optimizer"]
        saved = o["step_ms_trainable"] - o["step_ms_frozen"] + o["word_embedding_grad_ms"]
        # the share of a step with the word embeddings trainable (the timed step, or it plus what it saved)
        trainable_step = r["ours"]["train"]["ms"] + (saved if args.freeze_word_embeddings else 0.0)
        alt = f"{o['alt_step_ms_trainable']:.1f} ms ({o['alt_impl']})" if o["alt_step_ms_trainable"] else "-"
        rows.append([r["config"], f"{o['all_params'] / 1e6:.1f}M", f"{o['word_embedding_params'] / 1e6:.1f}M",
                     f"{o['step_ms_trainable']:.1f} ms", f"{o['step_ms_frozen']:.1f} ms",
                     f"{o['word_embedding_grad_ms']:.1f} ms", f"{saved:.1f} ms",
                     f"{100 * saved / trainable_step:.1f}%", alt])
    impl = results[0]["optimizer"]["impl"] if results else "?"
    out.append(f"\nThe word-embedding matrix, trainable vs frozen (model.py's step; model.configure_optimizer's "
               f"AdamW, {impl}; the last column: the same step with the other implementation):")
    out.append(format_table(header, rows))

    notes = []
    for r in results:
        line = (f"{r['config']}: N_nonembed = {r['non_embedding_params'] / 1e6:.2f}M, "
                f"{r['flops']['train'] / 1e12:.3f} TFLOP per step, {r['flops']['infer'] / 1e12:.3f} per inference, "
                f"measured matmul peak {r['measured_peak_tflops']:.3f} TFLOP/s")
        if "max_abs_diff" in r:
            line += f", max |ours - transformers| = {r['max_abs_diff']:.1e}"
        if "host_syncs_per_step" in r:
            line += f", host syncs per step {r['host_syncs_per_step']}"
        notes.append(line)
    out.append("\n" + "\n".join(notes))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=M.HelpFormatter)
    p.add_argument("--configs", nargs="+", default=["e5-small", "bert-base"], choices=list(SHAPES),
                   help="architecture shapes to time (mbert-base: BERT-base with mBERT's 119547-piece vocabulary)")
    p.add_argument("--batch_size", type=int, default=32, help="sentences per step")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--padding", type=float, default=0.0,
                   help="pad this fraction of the positions of every other row (0: full-length rows, "
                        "which the FLOP count assumes; padded positions are still computed and counted)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout of both models (train mode)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute dtype (bf16: autocast, weights and optimizer in fp32). auto: bf16 on CUDA, "
                        "fp32 on CPU, what model.autocast gives the scripts")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    p.add_argument("--freeze_word_embeddings", action="store_true",
                   help="time the step with the word-embedding matrix frozen in both models, as the scripts "
                        "fine-tune (default: every parameter trainable)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' forward")
    p.add_argument("--no_reference", action="store_true", help="time model.py's encoder alone (no transformers)")
    p.add_argument("--peak_size", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the card's bf16 peak for MFU (default on CUDA: looked up from the card's name)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and batch")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None, log=print):
    args = parse_args(argv)
    device = M.pick_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_size is None:
        args.peak_size = 8192 if device.type == "cuda" else 4096
    if args.repeats < 1 or args.warmup < 0:
        raise M.XltError("--repeats must be >= 1 and --warmup >= 0")
    if not args.no_reference:
        import_transformers()

    meta = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "dtype": args.dtype, "argv": sys.argv[1:] if argv is None else list(argv)}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
        if args.peak_tflops is None:
            args.peak_tflops = card_peak_tflops(meta["device_name"])
    else:
        meta["device_name"] = M.cpu_name()
    if not args.no_reference:
        meta["transformers"] = import_transformers().__version__
    meta["card_peak_tflops"] = args.peak_tflops
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    log(f"bench.py: {meta['device_name']} ({device.type}, {meta['threads']} threads), {args.dtype}, "
        f"torch {meta['torch']}" + (f", transformers {meta['transformers']}" if "transformers" in meta else "")
        + (f"; load average {load[0]:.1f} at start" if load else ""))
    meta["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    params = "all parameters but the word embeddings" if args.freeze_word_embeddings else "all parameters"
    log(f"batch {args.batch_size} x length {args.seq_len}, padding {args.padding:g}, dropout {args.dropout:g} "
        f"(both models in train mode), AdamW over {params}, loss = mean(h^2); {args.warmup} warm-up + "
        f"{args.repeats} timed rounds, ours/transformers/peak-matmul interleaved in every round"
        + (f"; OMP_WAIT_POLICY={meta['omp_wait_policy']}" if device.type == "cpu" else ""))
    if device.type == "cuda" and args.peak_tflops is None:
        log(f"MFU: no datasheet peak known for {meta['device_name']}; pass --peak_tflops")

    t0 = time.perf_counter()
    results = []
    for name in args.configs:
        results.append(bench_config(name, args, device, log))
    meta["seconds"] = time.perf_counter() - t0
    meta["peak_rss_gb"] = peak_rss_gb()
    if device.type == "cuda":
        meta["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if load:
        meta["load_average_start"] = load[0]
        meta["load_average_end"] = os.getloadavg()[0]
    log("")
    log(report(results, meta, args))
    if load:
        shared = max(meta["load_average_start"], meta["load_average_end"]) > (os.cpu_count() or 1)
        log(f"load average {meta['load_average_start']:.1f} at start, {meta['load_average_end']:.1f} at end "
            f"on {os.cpu_count()} CPUs" + (": the machine was shared with other work, so the absolute numbers "
            "are low and noisy; the interleaved ratios and the fraction of the peak measured alongside are the "
            "comparable figures." if shared else "."))
    mem = [f"peak resident memory {meta['peak_rss_gb']:.1f} GB"] if meta["peak_rss_gb"] else []
    if "peak_cuda_gb" in meta:
        mem.append(f"peak CUDA memory {meta['peak_cuda_gb']:.1f} GB")
    log(f"{meta['seconds']:.0f} s" + (f", {', '.join(mem)}" if mem else ""))
    out = {"meta": meta, "args": vars(args), "results": results}
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    try:
        main()
    except M.XltError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
