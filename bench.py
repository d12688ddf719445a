"""bench.py: how fast model.py's encoder trains and infers, against transformers' BERT, in one process.

    python bench.py                                      # e5-small and BERT-base shapes, batch 32, length 128
    python bench.py --device cuda --configs bert-base    # bf16 autocast on CUDA, with MFU
    python bench.py --no_reference --json out/bench.json

Per config (an architecture shape, random weights), our Encoder is saved (save_pretrained) and loaded by
transformers.AutoModel (sdpa): the same weights; their largest output difference is printed first. Each round times
ours, theirs (alternating which goes first) and one large matmul: the training step (forward, loss = mean(h^2),
backward, AdamW step; train mode) and inference, under model.autocast (bf16 on CUDA, fp32 on CPU). Reported: medians
over rounds; the speedup (their time / ours within a round: a shared machine's drift cancels); TFLOP/s (step_flops) vs
the matmul peak of the same rounds, on CUDA also the MFU (datasheet peak); the step's phases; our AdamW step with the
word embeddings trainable vs frozen, and the dense gradient backward builds for them (why the scripts freeze them).
"""
import os
import statistics
import sys
import tempfile
import time

# Spinning OpenMP waits (libgomp's default) lose badly on a shared CPU. Set before torch loads OpenMP; the env's wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import evaluate  # noqa: E402
import model as M  # noqa: E402

# On top of model.Config's defaults, BERT-base's (hidden 768, 12 layers and heads, FFN 3072, 512 positions).
# e5-small: intfloat/multilingual-e5-small (XLM-R's 250k pieces); bert-base-uncased; mbert-base: -multilingual-cased.
SHAPES = {"e5-small": dict(vocab_size=250037, hidden_size=384, intermediate_size=1536),
          "bert-base": dict(vocab_size=30522), "mbert-base": dict(vocab_size=119547),
          "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, max_position_embeddings=128)}

# Datasheet dense bf16 tensor-core peaks (TFLOP/s); the first key in the CUDA device name wins. None: we'd only guess.
CARD_PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
              ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
              ("A10G", None), ("A10", 125.0), ("A6000", 155.0)]


def non_embedding_params(encoder):
    """The N of the 6N rule: all parameters but the three embedding tables (a lookup is no matmul)."""
    return sum(p.numel() for n, p in encoder.named_parameters()
               if n not in ("embed.word.weight", "embed.position.weight", "embed.token_type.weight"))


def step_flops(n_nonembed, layers, hidden, batch, seq):
    """FLOPs of one training step on `batch` full sequences of length `seq`. Dense: each non-embedding weight
    does one multiply-add per token forward (2N FLOPs) and two backward (gradients of input and weight: 4N),
    6 * N * tokens. Attention has no weights: per layer and sequence QK^T is T*T*d multiply-adds per head,
    2 T^2 H FLOPs over the heads, AV the same: 4 T^2 H forward, twice that backward, 12 L T^2 H in all.
    Softmax, LayerNorm, GELU and the optimizer are not counted (the convention: they are memory-bound)."""
    return 6 * n_nonembed * batch * seq + 12 * layers * batch * seq * seq * hidden


def inference_flops(n_nonembed, layers, hidden, batch, seq):
    """Forward only: 2 * N * tokens + 4 * L * T^2 * H per sequence (see step_flops)."""
    return 2 * n_nonembed * batch * seq + 4 * layers * batch * seq * seq * hidden


def card_peak_tflops(name):
    return next((tflops for key, tflops in CARD_PEAKS if key.lower() in name.lower()), None)


def clock(device):
    """The time once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(device, fn, *args):
    """Wall and CPU seconds (this process, all threads) of fn(*args)."""
    t0, c0 = clock(device), time.process_time()
    fn(*args)
    return clock(device) - t0, time.process_time() - c0


def load_reference(ours, device):
    """transformers' model read from the directory our save_pretrained writes: the same weights."""
    try:
        import transformers
    except ImportError:
        raise M.XltError("transformers is not installed: pip install transformers to compare "
                         "(or pass --no_reference to time model.py's encoder alone)") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="xlt-bench-") as tmp:
        ours.save_pretrained(tmp)
        return transformers.AutoModel.from_pretrained(tmp, attn_implementation="sdpa",
                                                      add_pooling_layer=False).to(device)


class Runner:
    """One model, its optimizer, a uniform forward(input_ids, attention_mask) -> (B, T, H), and its times."""

    def __init__(self, name, module, forward, device, args):
        self.name, self.module, self.device = name, module.train(), device
        self.forward = torch.compile(forward) if args.compile else forward
        self.opt = M.configure_optimizer([module], lr=1e-5, weight_decay=0.01)
        self.wall, self.cpu = {"train": [], "infer": []}, {"train": [], "infer": []}     # seconds
        self.phases = {"forward": [], "backward": [], "optimizer": []}

    def loss(self, batch):
        with M.autocast(self.device):
            return self.forward(batch["input_ids"], batch["attention_mask"]).float().pow(2).mean()

    def train_step(self, batch, total=True, phases=True):
        """Forward + loss, backward, AdamW step; appends its times. With `phases` the clock is read between them
        too, which on CUDA synchronises the stream: there the phases are timed in separate steps."""
        marks, c0 = [clock(self.device)], time.process_time()
        loss = self.loss(batch)
        marks += [clock(self.device)] if phases else []
        loss.backward()
        marks += [clock(self.device)] if phases else []
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        marks.append(clock(self.device))
        if total:
            self.wall["train"].append(marks[-1] - marks[0])
            self.cpu["train"].append(time.process_time() - c0)
        for k, a, b in zip(self.phases, marks, marks[1:]) if phases else ():
            self.phases[k].append(b - a)

    def infer(self, batch):
        with M.evaluating(self.module), torch.inference_mode(), M.autocast(self.device):
            wall, cpu = timed(self.device, self.forward, batch["input_ids"], batch["attention_mask"])
        self.wall["infer"].append(wall)
        self.cpu["infer"].append(cpu)


def optimizer_breakdown(run, batch, repeats):
    """Our AdamW step over all parameters vs with the word embeddings frozen (the scripts' default when
    fine-tuning), and the dense word-embedding gradient that backward builds when they are trainable."""
    enc, ids, word = run.module, batch["input_ids"], run.module.embed.word.weight
    run.opt, opts = None, {}                          # free the timed optimizer's state first
    for trainable in (False, True):
        word.requires_grad_(trainable)
        opts[trainable] = M.configure_optimizer([enc], lr=1e-5, weight_decay=0.01)
    run.loss(batch).backward()      # gradients for every parameter; both optimizers step on them, never zeroed
    # A trainable nn.Embedding's backward: a dense zero-filled (V, H) gradient, each token's gradient added to its row.
    g = torch.randn(*ids.shape, enc.config.hidden_size, device=run.device)
    work = {"step_ms_trainable": opts[True].step, "step_ms_frozen": opts[False].step, "word_embedding_grad_ms":
            lambda: torch.ops.aten.embedding_dense_backward(g, ids, enc.config.vocab_size, -1, False)}
    times = {k: [] for k in work}
    for r in range(repeats + 1):    # round 0 warms up (AdamW creates its state on its first step): not counted
        for k in list(work)[:: 1 if r % 2 else -1]:
            times[k].append(timed(run.device, work[k])[0])
    return {"all_params": sum(p.numel() for p in enc.parameters()), "word_embedding_params": word.numel(),
            **{k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}}


def bench_config(name, args, device, log):
    config = M.Config(model_type="bert", hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
                      **SHAPES[name])
    torch.manual_seed(args.seed)
    ours, theirs = M.Encoder(config), None
    ours.embed.word.weight.requires_grad_(not args.freeze_word_embeddings)
    if not args.no_reference:
        theirs = load_reference(ours, device)
        theirs.get_input_embeddings().weight.requires_grad_(not args.freeze_word_embeddings)
    g = torch.Generator().manual_seed(args.seed)      # random full-length ids: timing needs no special tokens
    ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = {"config": name, "shape": config.to_hf(), "batch_size": args.batch_size, "seq_len": args.seq_len}
    runners = [Runner("ours", ours.to(device), ours, device, args)]
    if theirs is not None:
        with M.evaluating(ours, theirs), M.autocast(device):
            diff = (ours(**batch).float() - theirs(**batch).last_hidden_state.float()).abs().max().item()
        res["max_abs_diff"] = diff
        log(f"[{name}] outputs of ours and transformers' on the same batch (eval): max |diff| = {diff:.2e}")
        runners.append(Runner("transformers", theirs,
                              lambda i, m: theirs(input_ids=i, attention_mask=m).last_hidden_state, device, args))
    cuda = device.type == "cuda"                     # where model.autocast computes in bf16
    peak = torch.randn(args.peak_size, args.peak_size, device=device, dtype=torch.bfloat16 if cuda else None)
    inner = 10 if cuda else 1                        # one GPU matmul is too short to time alone
    peak_times, rounds, t_start = [], args.warmup_rounds + args.repeats, time.perf_counter()
    for r in range(rounds):
        order = runners if r % 2 == 0 else runners[::-1]
        for run in order:
            run.train_step(batch, phases=not cuda)   # on CPU reading the clock between phases costs nothing
        for run in order:
            run.infer(batch)
        peak_times.append(timed(device, lambda: [torch.mm(peak, peak) for _ in range(inner)])[0] / inner)
        steps = ", ".join(f"{run.name} step {run.wall['train'][-1] * 1e3:.0f} ms" for run in runners)
        log(f"[{name}] round {r + 1}/{rounds}{' (warm-up)' if r < args.warmup_rounds else ''}: {steps} "
            f"({time.perf_counter() - t_start:.0f} s)")
    for run in runners * rounds if cuda else []:     # CUDA: the phases in separate steps, round by round
        run.train_step(batch, total=False)

    def med(times):                                  # the median over the timed rounds
        return statistics.median(times[args.warmup_rounds:])

    n_ne = non_embedding_params(ours)
    flops = {k: f(n_ne, config.num_hidden_layers, config.hidden_size, args.batch_size, args.seq_len)
             for k, f in (("train", step_flops), ("infer", inference_flops))}
    peak_tflops = 2 * args.peak_size ** 3 / med(peak_times) / 1e12
    res.update(non_embedding_params=n_ne, flops=flops, measured_peak_tflops=peak_tflops)
    for run in runners:
        res[run.name] = {"phases_ms": {k: med(v) * 1e3 for k, v in run.phases.items()}}
        for kind, times in run.wall.items():
            ms, cpu_ms = med(times) * 1e3, med(run.cpu[kind]) * 1e3
            tflops = flops[kind] / ms / 1e9
            res[run.name][kind] = {"ms": ms, "all_ms": [t * 1e3 for t in times[args.warmup_rounds:]], "tflops": tflops,
                                   "fraction_of_measured_peak": tflops / peak_tflops, "cpu_ms": cpu_ms,
                                   **({"mfu": tflops / args.peak_tflops} if args.peak_tflops else {})}
    if theirs is not None:  # paired within a round, the load's drift between rounds cancels; CPU time is disturbed less
        a, b = runners
        res["speedup"] = {k: med([t / o for o, t in zip(a.wall[k], b.wall[k])]) for k in a.wall}
        res["speedup_cpu_time"] = {k: med([t / o for o, t in zip(a.cpu[k], b.cpu[k])]) for k in a.cpu}
    res["optimizer"] = optimizer_breakdown(runners[0], batch, args.repeats)
    return res


# Process start to the first optimizer step on e5 (a script's wait before training): load the tokenizer and
# the weights, move them to the device, one AdamW step on one batch. argv: launch time (time.time()), device,
# "ours" or the directory of the same weights in Hugging Face layout for transformers.
FIRST_STEP = r"""
import json, sys, time
import torch
import data, model
device, what = torch.device(sys.argv[2]), sys.argv[3]
texts = ["query: one short sentence to start with"] * 8
if what == "ours":
    tok = data.load_tokenizer("intfloat/multilingual-e5-small")
    enc = model.Encoder.from_pretrained("intfloat/multilingual-e5-small", verbose=False).to(device)
    batch = data.to_device(data.pad_batch(data.encode(tok, texts, 128), data.special_ids(tok)["pad"]), device)
    forward = lambda: enc(batch["input_ids"], batch["attention_mask"])
else:
    import transformers
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=what + "/tokenizer.json", pad_token="<pad>")
    enc = transformers.AutoModel.from_pretrained(what, add_pooling_layer=False).to(device)
    batch = tok(texts, return_tensors="pt", padding=True).to(device)
    forward = lambda: enc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
opt = model.configure_optimizer([enc], 1e-5, 0.01)
with model.autocast(device):
    loss = forward().float().pow(2).mean()
loss.backward()
opt.step()
if device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.time() - float(sys.argv[1])}))
"""


def first_step(device, log):
    """Seconds from process start to the first optimizer step on e5, in fresh processes: ours with an empty
    e5 cache (XLT_CACHE; the 4-bit file is dequantised and its tokenizer rebuilt), ours again (warm cache), and
    transformers.AutoModel.from_pretrained on the same weights saved in Hugging Face layout."""
    import json
    import subprocess
    import data
    root = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="xlt-first-step-") as tmp:
        env = dict(os.environ, XLT_CACHE=os.path.join(tmp, "cache"),
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        M.Encoder.from_pretrained("intfloat/multilingual-e5-small", verbose=False).save_pretrained(
            os.path.join(tmp, "hf"), tokenizer=data.load_tokenizer("intfloat/multilingual-e5-small"))
        times = {}
        for label, what in (("ours, cold cache", "ours"), ("ours, warm cache", "ours"),
                            ("transformers", os.path.join(tmp, "hf"))):
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", FIRST_STEP, repr(t0), str(device), what], env=env, cwd=tmp,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise M.XltError(f"first-step run ({label}) failed: {r.stderr.strip().splitlines()[-1]}")
            times[label] = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
            log(f"[first step] {label}: {times[label]:.1f} s from process start to the first optimizer step")
    return times


def report(results, args, cpu):
    """Three tables (evaluate.markdown_table, two decimals)."""
    speed, phases, words = {}, {}, {}
    for r in results:
        for kind, label in (("train", "train step"), ("infer", "inference")):
            o, t = r["ours"][kind], r.get("transformers", {}).get(kind, {})
            speed[f"{r['config']} {label}"] = {
                "ours ms": o["ms"], "transformers ms": t.get("ms"), "speedup": r.get("speedup", {}).get(kind),
                **({"speedup, CPU time": r.get("speedup_cpu_time", {}).get(kind)} if cpu else {}),
                "ours TFLOP/s": o["tflops"], "measured peak TFLOP/s": r["measured_peak_tflops"],
                "% of measured peak": 100 * o["fraction_of_measured_peak"],
                **({f"MFU % (of {args.peak_tflops:g})": 100 * o["mfu"]} if "mfu" in o else {})}
        for name in [n for n in ("ours", "transformers") if n in r]:
            phases[f"{r['config']} {name}"] = {**r[name]["phases_ms"], "step": r[name]["train"]["ms"]}
        o = r["optimizer"]
        saved = o["step_ms_trainable"] - o["step_ms_frozen"] + o["word_embedding_grad_ms"]
        words[r["config"]] = {
            "params M": o["all_params"] / 1e6, "word emb. M": o["word_embedding_params"] / 1e6,
            "opt step, emb trainable": o["step_ms_trainable"], "opt step, emb frozen": o["step_ms_frozen"],
            "emb grad in backward": o["word_embedding_grad_ms"], "saved by freezing": saved}
    tables = [evaluate.markdown_table(rows, digits=2, row_name=row_name, averages=False)
              for rows, row_name in ((speed, "config, phase"), (phases, "config, model"), (words, "config"))]
    return "\n".join([
        tables[0],
        "speedup: the median over rounds of transformers' time / ours in the same round (>= 1: ours is faster)",
        "\nWhere the training step's time goes (ms, medians; forward includes the loss):", tables[1],
        "\nThe word-embedding matrix, trainable vs frozen (ms; model.py's step, model.configure_optimizer's AdamW):",
        tables[2]])


def main(argv=None, log=print):
    args = build_parser().parse_args(argv)
    device = M.pick_device(args.device)
    cuda = device.type == "cuda"
    for name in args.configs:
        if args.seq_len > (n := M.Config(**SHAPES[name]).max_position_embeddings):
            raise M.XltError(f"--seq_len {args.seq_len} exceeds the {name} shape's {n} positions")
    args.peak_size = args.peak_size or (8192 if cuda else 4096)
    if cuda and args.peak_tflops is None:
        args.peak_tflops = card_peak_tflops(torch.cuda.get_device_name(device))
    load = getattr(os, "getloadavg", lambda: [float("nan")])     # a shared machine's times are low and noisy
    meta = {"hardware": evaluate.hardware(device), "device": device.type, "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "argv": sys.argv[1:] if argv is None else list(argv),
            "load_average_start": load()[0]}
    log(f"bench.py: {meta['hardware']}, {'bf16' if cuda else 'fp32'}, load average {load()[0]:.1f}; "
        f"batch {args.batch_size} x length {args.seq_len}, dropout {args.dropout:g}, "
        f"{args.warmup_rounds} warm-up + {args.repeats} rounds"
        + ("; no datasheet peak known for this card: pass --peak_tflops for the MFU" if cuda and not args.peak_tflops
           else ""))
    t0 = time.perf_counter()
    results = [bench_config(name, args, device, log) for name in args.configs]
    first = first_step(device, log) if args.first_step else None
    meta.update(seconds=time.perf_counter() - t0, load_average_end=load()[0],
                transformers=getattr(sys.modules.get("transformers"), "__version__", None))
    log("\n" + report(results, args, cpu=not cuda))
    if first:
        log("\nProcess start to the first optimizer step, e5 (s): "
            + ", ".join(f"{label} {t:.1f}" for label, t in first.items()))
    log(f"{meta['seconds']:.0f} s; load average {meta['load_average_end']:.1f} at the end, on {os.cpu_count()} CPUs")
    out = {"meta": meta, "args": vars(args), "results": results, **({"first_step": first} if first else {})}
    if args.json:
        evaluate.write_json(args.json, out)
    return out


def build_parser():
    p = evaluate.parser(__doc__)
    add, pos = p.add_argument, evaluate.positive_int
    add("--configs", nargs="+", default=["e5-small", "bert-base"], choices=list(SHAPES), help="shapes to time")
    add("--batch_size", type=pos, default=32, help="sentences per step")
    add("--seq_len", type=pos, default=128, help="tokens per sequence (no padding)")
    add("--dropout", type=evaluate.fraction, default=0.1, help="every dropout probability of both models")
    add("--device", type=evaluate.device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add("--warmup_rounds", type=evaluate.nonneg_int, default=1, help="untimed rounds first")
    add("--repeats", type=pos, default=3, help="timed rounds; the median is reported")
    add("--freeze_word_embeddings", action="store_true", help="time the step with the word-embedding matrix "
        "frozen in both models, as the scripts fine-tune (default: every parameter trainable)")
    add("--compile", action="store_true", help="torch.compile both models' forward")
    add("--no_reference", action="store_true", help="time model.py's encoder alone (no transformers)")
    add("--first_step", action="store_true", help="also time process start to the first optimizer step on e5, "
        "ours with a cold and a warm cache and transformers' from_pretrained, in fresh processes")
    add("--peak_size", type=pos, default=None, help="side of the peak's square matmul (default 4096; CUDA 8192)")
    add("--peak_tflops", type=evaluate.positive_float, default=None, help="dense bf16 peak for the MFU "
        "(default on CUDA: CARD_PEAKS by the card's name)")
    add("--seed", type=evaluate.nonneg_int, default=0, help="seed of the random weights and batch")
    add("--json", type=evaluate.nonempty, default=None, help="also write the results to this file")
    return p


if __name__ == "__main__":
    evaluate.cli(main)
