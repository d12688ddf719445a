"""Tests of data.py: readers on real and on malformed files, label alignment, batching, masking.

Tests on the real datasets read $XLT_DATA (default: ../shared/data next to the repository) and are
skipped when it is not there. Run: XLT_DATA=/path/to/data python -m pytest -q tests/test_data.py
"""
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

import data
from data import DataError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir():
    d = Path(os.environ.get("XLT_DATA") or ROOT.parent / "shared" / "data")
    if not d.is_dir():
        pytest.skip(f"no shared data at {d} (set XLT_DATA)")
    return d


def need(data_dir, name):
    if not (data_dir / name).is_dir():
        pytest.skip(f"{name} not in {data_dir}")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# where the data lives
# ----------------------------------------------------------------------------------------------------

def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XLT_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("XLT_DATA")
    assert data.resolve_data_dir() == Path.home() / ".cache" / "xlt" / "data"


def test_missing_dataset_names_it_and_says_how_to_get_it(tmp_path):
    readers = [(lambda: data.read_sib200(tmp_path, "eng_Latn", "train"), "sib200"),
               (lambda: data.read_tatoeba(tmp_path, "deu"), "tatoeba"),
               (lambda: data.read_nusax(tmp_path, "english", "train"), "nusax"),
               (lambda: data.ud_ewt_file(tmp_path, "train"), "ud"),
               (lambda: data.ud_pud_files(tmp_path), "ud")]
    for read, name in readers:
        with pytest.raises(DataError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg
        assert str(tmp_path / name) in msg
        assert f"python data.py download --data_dir {tmp_path} --only {name}" in msg
    # The dataset is there but not this language / file.
    (tmp_path / "sib200").mkdir()
    with pytest.raises(DataError, match="no SIB-200 language 'xxx_Latn'"):
        data.read_sib200(tmp_path, "xxx_Latn", "train")
    (tmp_path / "sib200" / "eng_Latn").mkdir()
    with pytest.raises(DataError, match=r"train\.tsv does not exist; run `python data.py download"):
        data.read_sib200(tmp_path, "eng_Latn", "train")
    with pytest.raises(DataError, match="SIB-200 has no split 'valid'"):
        data.read_sib200(tmp_path, "eng_Latn", "valid")


class FakeResponse:
    def __init__(self, body):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return self.body


def offline(url, timeout=None):
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_download_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "urlopen", offline)
    for name in ("tatoeba", "sib200"):
        with pytest.raises(DataError) as e:
            data.download(tmp_path, which=(name,))
        msg = str(e.value)
        assert "\n" not in msg
        assert f"{name} data is missing from {tmp_path / name}" in msg
        assert "Temporary failure in name resolution" in msg and "https://" in msg
    assert not list(tmp_path.rglob("*.part"))


def test_download_is_resumable(tmp_path, monkeypatch):
    urls = []

    def fake(url, timeout=None):
        urls.append(url)
        return FakeResponse(url.encode())
    monkeypatch.setattr(data, "urlopen", fake)
    data.download(tmp_path, which=("ud",))
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == len(urls) == 3 + 20            # EWT train/dev/test + 20 PUD test sets
    assert not [p for p in files if p.name.endswith(".part")]
    ewt = tmp_path / "ud" / "UD_English-EWT" / "en_ewt-ud-train.conllu"
    assert ewt.read_text() == ("https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/"
                               "15d613d8447b3478787d4c278730a1e48a945efb/en_ewt-ud-train.conllu")
    # A rerun offline skips what is there, and fetches only a file left empty.
    monkeypatch.setattr(data, "urlopen", offline)
    data.download(tmp_path, which=("ud",))
    ewt.write_bytes(b"")
    with pytest.raises(DataError, match="ud data is missing"):
        data.download(tmp_path, which=("ud",))
    monkeypatch.setattr(data, "urlopen", fake)
    urls.clear()
    data.download(tmp_path, which=("ud",))
    assert urls == [ewt.read_text()]


def test_cli_flags_are_checked_before_any_download(tmp_path):
    for only in ("bogus", "sib200,,ud"):
        r = subprocess.run([sys.executable, "data.py", "download", "--data_dir", str(tmp_path), "--only", only],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and not any(tmp_path.iterdir())
        assert r.stderr.splitlines()[-1] == (f"data.py download: error: argument --only: {only!r} is not a subset "
                                             "of ('sib200', 'tatoeba', 'ud', 'nusax')")


# ----------------------------------------------------------------------------------------------------
# SIB-200
# ----------------------------------------------------------------------------------------------------

def test_sib200_real(data_dir):
    need(data_dir, "sib200")
    assert len(data.sib200_languages(data_dir)) == 205
    counts = {s: len(data.read_sib200(data_dir, "eng_Latn", s)) for s in ("train", "dev", "test")}
    assert counts == {"train": 701, "dev": 99, "test": 204}
    train = data.read_sib200(data_dir, "eng_Latn", "train")
    assert train[0]["index_id"] == 431 and train[0]["category"] == "geography"
    assert train[0]["text"].startswith("Turkey is encircled by seas on three sides")
    assert all(r["label"] == data.SIB200_LABELS.index(r["category"]) for r in train)
    # SOURCE.md's "label counts in train" are in fact over all 1,004 rows (train 701 + dev 99 + test 204).
    every = [r for s in ("train", "dev", "test") for r in data.read_sib200(data_dir, "eng_Latn", s)]
    assert Counter(r["category"] for r in every) == {
        "science/technology": 252, "travel": 198, "politics": 146, "sports": 122, "health": 110,
        "entertainment": 93, "geography": 83}
    assert sorted(data.SIB200_LABELS) == sorted((data_dir / "sib200" / "labels.txt").read_text().split())
    pairs = data.sib200_parallel(data_dir, "eng_Latn", "fra_Latn", "train")
    assert len(pairs) == 701
    fra = data.read_sib200(data_dir, "fra_Latn", "train")
    assert pairs[0] == (train[0]["text"], fra[0]["text"]) and pairs[0][0] != pairs[0][1]


SIB_HEADER = "index_id\tcategory\ttext\n"


def test_sib200_quoting(tmp_path):
    write(tmp_path / "sib200" / "xx_Latn" / "dev.tsv",
          SIB_HEADER + '5\tsports\t"He said ""hi"" there"\n12\ttravel\tplain text\n')
    rows = data.read_sib200(tmp_path, "xx_Latn", "dev")
    assert rows == [{"index_id": 5, "label": data.SIB200_LABELS.index("sports"), "category": "sports",
                     "text": 'He said "hi" there'},
                    {"index_id": 12, "label": 6, "category": "travel", "text": "plain text"}]


@pytest.mark.parametrize("body, message", [
    # one stray quote at the start of a text swallowed the rows up to the next quote (93 of 204 rows of a test set)
    ('1\tsports\t"Stray quote\n2\tsports\tok\n3\ttravel\tends with a quote"\n', "line 2: a quoted field runs on to "
     "line 4"),
    ('1\tsports\t"Stray quote\n2\tsports\tok\n3\ttravel\t"quoted" text\n', "line 2: '\\t' expected after '\"'"),
    ('1\tsports\tok\n2\tsports\t"Stray quote\n3\tsports\tok\n', "line 3: unexpected end of data"),
    ('1\tsports\t"a\tb"\n', "line 2: a quoted field holds a tab"),
    ('1\tsports\t"quoted" and more\n', "line 2: '\\t' expected after '\"'"),
])
def test_sib200_stray_quote_names_the_line_it_starts(tmp_path, body, message):
    path = write(tmp_path / "sib200" / "xx_Latn" / "test.tsv", SIB_HEADER + body)
    with pytest.raises(DataError) as e:
        data.read_sib200(tmp_path, "xx_Latn", "test")
    assert str(e.value).startswith(f"{path} {message}")


@pytest.mark.parametrize("body, message", [
    ("1\tsports\tok\n2\tsports\n", "line 3: expected 3 columns (index_id, category, text), got 2"),
    ("1\tsports\tok\n2\tcooking\tpasta\n", "line 3: unknown category 'cooking' (expected one of entertainment"),
    ("x1\tsports\tok\n", "line 2: index_id must be a non-negative integer, got 'x1'"),
    ("1\tsports\tok\textra\n", "line 2: expected 3 columns (index_id, category, text), got 4"),
    ("1\tsports\tok\n2\tsports\t \n", "line 3: the 'text' field is empty"),      # would still get a prediction
])
def test_sib200_malformed(tmp_path, body, message):
    path = write(tmp_path / "sib200" / "xx_Latn" / "train.tsv", SIB_HEADER + body)
    with pytest.raises(DataError) as e:
        data.read_sib200(tmp_path, "xx_Latn", "train")
    assert str(e.value) == f"{path} {message}" or str(e.value).startswith(f"{path} {message}")


def test_sib200_bad_header(tmp_path):
    path = write(tmp_path / "sib200" / "xx_Latn" / "train.tsv", "id\tlabel\ttext\n1\tsports\tok\n")
    with pytest.raises(DataError, match=f"{path} line 1: expected the header"):
        data.read_sib200(tmp_path, "xx_Latn", "train")


def test_sib200_all_languages_load(data_dir):
    need(data_dir, "sib200")
    sizes = {(lang, split): len(data.read_sib200(data_dir, lang, split))
             for lang in data.sib200_languages(data_dir) for split in ("train", "dev", "test")}
    assert len(sizes) == 3 * 205 and set(sizes.values()) == {701, 99, 204}


def test_sib200_bytes_and_layout(tmp_path):
    """Undecodable bytes name the line they are on (the csv reader's count said line 0); a BOM and CRLF line
    ends are read as the text they carry; a NUL byte, a header alone, a reused index_id and a directory
    in place of the file are each one line."""
    path = tmp_path / "sib200" / "xx_Latn" / "train.tsv"
    path.parent.mkdir(parents=True)
    path.write_bytes((SIB_HEADER + "1\tsports\tok\n2\tsports\tcaf").encode() + b"\xe9\n")
    with pytest.raises(DataError, match=f"^{path} line 3: not UTF-8 \\(byte 0xe9\\)$"):
        data.read_sib200(tmp_path, "xx_Latn", "train")
    path.write_bytes(b"\xef\xbb\xbf" + (SIB_HEADER + "1\tsports\tok\n").replace("\n", "\r\n").encode())
    assert data.read_sib200(tmp_path, "xx_Latn", "train") == [
        {"index_id": 1, "label": data.SIB200_LABELS.index("sports"), "category": "sports", "text": "ok"}]
    for body, message in (("1\tsports\tok\n2\tsports\tn\0t\n", " line 3: a NUL byte"), ("", ": a header but no rows"),
                          ("1\tsports\tok\n\n1\ttravel\tagain\n", " line 4: index_id 1 again (first on line 2)")):
        write(path, SIB_HEADER + body)
        with pytest.raises(DataError) as e:
            data.read_sib200(tmp_path, "xx_Latn", "train")
        assert str(e.value).startswith(f"{path}{message}")
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match=f"^{path} is a directory, not a file; run `python data.py download"):
        data.read_sib200(tmp_path, "xx_Latn", "train")


# ----------------------------------------------------------------------------------------------------
# Tatoeba, NusaX, pair TSVs, parallel and monolingual text
# ----------------------------------------------------------------------------------------------------

def test_tatoeba(data_dir, tmp_path):
    need(data_dir, "tatoeba")
    langs = data.tatoeba_languages(data_dir)
    assert len(langs) == 112 and "deu" in langs and "eng" not in langs
    deu, eng = data.read_tatoeba(data_dir, "deu")
    assert len(deu) == len(eng) == 1000
    assert sum(len(data.read_tatoeba(data_dir, lang)[0]) for lang in langs) == 88877


def test_tatoeba_mismatched_lengths(tmp_path):
    a = write(tmp_path / "tatoeba" / "tatoeba.xyz-eng.xyz", "eins\nzwei\ndrei\n")
    b = write(tmp_path / "tatoeba" / "tatoeba.xyz-eng.eng", "one\ntwo\n")
    with pytest.raises(DataError, match=f"{a} has 3 lines but {b} has 2: they must be line-aligned"):
        data.read_tatoeba(tmp_path, "xyz")
    write(b, "one\ntwo\r\nthree\n")       # a stray \r must not break alignment
    assert data.read_tatoeba(tmp_path, "xyz") == (["eins", "zwei", "drei"], ["one", "two", "three"])


def test_tatoeba_empty_sides(tmp_path):
    a = write(tmp_path / "tatoeba" / "tatoeba.xyz-eng.xyz", "")
    b = write(tmp_path / "tatoeba" / "tatoeba.xyz-eng.eng", "one\n")
    with pytest.raises(DataError, match=f"^{a} is empty$"):
        data.read_tatoeba(tmp_path, "xyz")
    write(a, "eins\n\n")
    write(b, "one\ntwo\n")
    with pytest.raises(DataError, match=f"^{a} line 2: an empty sentence"):
        data.read_tatoeba(tmp_path, "xyz")


def test_nusax(data_dir, tmp_path):
    need(data_dir, "nusax")
    assert len(data.nusax_languages(data_dir)) == 12
    counts = {s: len(data.read_nusax(data_dir, "javanese", s)) for s in ("train", "valid", "test")}
    assert counts == {"train": 500, "valid": 100, "test": 400}
    assert data.read_nusax(data_dir, "english", "dev") == data.read_nusax(data_dir, "english", "valid")
    train = Counter(data.NUSAX_LABELS[r["label"]] for r in data.read_nusax(data_dir, "english", "train"))
    assert train == {"positive": 189, "neutral": 119, "negative": 192}


def test_nusax_unknown_label(tmp_path):
    path = write(tmp_path / "nusax" / "sentiment" / "xx" / "test.csv", 'id,text,label\n1,"good, very",positive\n'
                                                                       "2,meh,mixed\n")
    with pytest.raises(DataError, match=f"{path} line 3: unknown label 'mixed'"):
        data.read_nusax(tmp_path, "xx", "test")


def test_nusax_mt(data_dir, tmp_path):
    need(data_dir, "nusax")
    pairs = data.read_nusax_mt(data_dir, "javanese", "train")
    english = [r["text"] for r in data.read_nusax(data_dir, "english", "train")]
    assert len(pairs) == 500 and pairs[0][0] == english[0]             # the mt set is the sentiment set, translated
    assert pairs[0][1] == data.read_nusax(data_dir, "javanese", "train")[0]["text"]
    with pytest.raises(DataError, match="no language 'klingon'"):
        data.read_nusax_mt(data_dir, "klingon", "train")
    bad = write(tmp_path / "nusax" / "mt" / "test.csv", "id,english\n1,hello\n")
    with pytest.raises(DataError, match=f"{bad} line 1: expected the header"):
        data.read_nusax_mt(tmp_path, "javanese", "test")


def test_read_pair_tsv(tmp_path):
    xnli = write(tmp_path / "xnli.tsv", 'premise\thypo\tlabel\nA "quoted" man.\tA man.\tentailment\n'
                                        "A dog.\tA cat.\tcontradictory\nX.\tY.\tneutral\n")
    assert data.read_pair_tsv(xnli) == [{"text_a": 'A "quoted" man.', "text_b": "A man.", "label": 0},
                                        {"text_a": "A dog.", "text_b": "A cat.", "label": 2},
                                        {"text_a": "X.", "text_b": "Y.", "label": 1}]
    test = write(tmp_path / "xnli.test.tsv", "language\tgold_label\tsentence1\tsentence2\n"
                                             "de\tcontradiction\tEin Hund.\tEine Katze.\n")
    assert data.read_pair_tsv(test) == [{"text_a": "Ein Hund.", "text_b": "Eine Katze.", "label": 2}]
    paws = write(tmp_path / "paws.tsv", "id\tsentence1\tsentence2\tlabel\n7\tA b.\tB a.\t1\n8\tC.\tD.\t0\n")
    assert [r["label"] for r in data.read_pair_tsv(paws)] == [1, 0]
    bad = write(tmp_path / "bad.tsv", "sentence1\tsentence2\tlabel\nA.\tB.\tmaybe\n")
    with pytest.raises(DataError, match=f"{bad} line 2: unknown label 'maybe'"):
        data.read_pair_tsv(bad)
    short = write(tmp_path / "short.tsv", "sentence1\tsentence2\tlabel\nA.\tB.\t1\nA.\t1\n")
    with pytest.raises(DataError, match=f"{short} line 3: expected 3 tab-separated columns, got 2"):
        data.read_pair_tsv(short)
    headless = write(tmp_path / "headless.tsv", "A.\tB.\t1\n")
    with pytest.raises(DataError, match=f"{headless} line 1: the header must name"):
        data.read_pair_tsv(headless)


def test_read_parallel_and_mono(tmp_path):
    a, b = write(tmp_path / "a.txt", "x1\nx2\n"), write(tmp_path / "b.txt", "y1\ny2\n")
    assert data.read_parallel(a, b) == [("x1", "y1"), ("x2", "y2")]
    tsv = write(tmp_path / "ab.tsv", "x1\ty1\nx2\ty2\n")
    assert data.read_parallel(tsv) == [("x1", "y1"), ("x2", "y2")]
    bad = write(tmp_path / "bad.tsv", "x1\ty1\nx2 y2\n")
    with pytest.raises(DataError, match=f"{bad} line 2: expected 2 tab-separated columns, got 1"):
        data.read_parallel(bad)
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.txt'} does not exist"):
        data.read_parallel(tmp_path / "nope.txt", b)
    assert data.read_mono(write(tmp_path / "m.txt", "one\n\n  two \n\n")) == ["one", "two"]
    for reader in (data.read_mono, data.read_parallel, data.read_pair_tsv):
        with pytest.raises(DataError, match=f"^{tmp_path / 'e.txt'} is empty$"):
            reader(write(tmp_path / "e.txt", " \n"))
    with pytest.raises(DataError, match=f"^{tmp_path / 'h.tsv'}: a header but no rows$"):
        data.read_pair_tsv(write(tmp_path / "h.tsv", "premise\thypo\tlabel\n"))


# ----------------------------------------------------------------------------------------------------
# CoNLL-U
# ----------------------------------------------------------------------------------------------------

CONLLU = """# sent_id = 1
# text = Je vais au marché.
1\tJe\tje\tPRON\t_\t_\t2\tnsubj\t_\t_
2\tvais\taller\tVERB\t_\t_\t0\troot\t_\t_
3-4\tau\t_\t_\t_\t_\t_\t_\t_\t_
3\tà\tà\tADP\t_\t_\t5\tcase\t_\t_
4\tle\tle\tDET\t_\t_\t5\tdet\t_\t_
5\tmarché\tmarché\tNOUN\t_\t_\t2\tobl\t_\t_
5.1\tva\taller\tVERB\t_\t_\t_\t_\t2:conj\t_
6\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_

# sent_id = 2
1\tOui\toui\tINTJ\t_\t_\t0\troot\t_\t_"""          # no blank line at the end of the file


def test_conllu_multiword_tokens_and_empty_nodes(tmp_path):
    sents = data.read_conllu(write(tmp_path / "x.conllu", CONLLU))
    assert sents == [{"words": ["Je", "vais", "à", "le", "marché", "."],
                      "upos": ["PRON", "VERB", "ADP", "DET", "NOUN", "PUNCT"],
                      "sent_id": "1", "text": "Je vais au marché."},
                     {"words": ["Oui"], "upos": ["INTJ"], "sent_id": "2", "text": None}]


@pytest.mark.parametrize("line, message", [
    ("4\tle\tle\tDET\t_\t_\t5\tdet\t_", "line 7: expected 10 tab-separated columns, got 9"),
    ("4\tle\tle\tDETERMINER\t_\t_\t5\tdet\t_\t_", "line 7: unknown UPOS tag 'DETERMINER'"),
])
def test_conllu_malformed(tmp_path, line, message):
    path = write(tmp_path / "bad.conllu", CONLLU.replace("4\tle\tle\tDET\t_\t_\t5\tdet\t_\t_", line))
    with pytest.raises(DataError) as e:
        data.read_conllu(path)
    assert str(e.value) == f"{path} {message}"


def test_conllu_bad_bytes_and_empty_files(tmp_path):
    raw = CONLLU.encode().replace("marché".encode(), b"march\xe9", 1)           # Latin-1, on line 2
    path = tmp_path / "latin1.conllu"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=f"^{path} line 2: not UTF-8 \\(byte 0xe9\\)$"):
        data.read_conllu(path)
    for name, text, message in (("empty.conllu", "", "is empty"), ("blank.conllu", "\n\n", "is empty"),
                                ("comments.conllu", "# sent_id = 1\n\n", ": no sentences")):
        path = write(tmp_path / name, text)
        with pytest.raises(DataError, match=f"^{path} ?{message}"):
            data.read_conllu(path)
    with pytest.raises(DataError, match=f"^{tmp_path} is a directory, not a file$"):
        data.read_conllu(tmp_path)


def test_ud_real(data_dir):
    need(data_dir, "ud")
    sents = data.read_conllu(data.ud_ewt_file(data_dir, "train"))
    assert len(sents) == 12544 and sum(len(s["words"]) for s in sents) == 204577     # README
    assert set(t for s in sents for t in s["upos"]) == set(data.UPOS_TAGS)
    pud = data.ud_pud_files(data_dir)
    assert len(pud) == 20 and {"en", "de", "ja", "zh", "is"} <= set(pud)
    assert len(data.read_conllu(pud["de"])) == 1000


# ----------------------------------------------------------------------------------------------------
# tokenization
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def wordpiece(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", ".", "un", "##believ", "##able",
             "##s", "on", "mat"]
    return data.wordpiece_tokenizer(write(tmp_path / "vocab.txt", "\n".join(vocab) + "\n"), lowercase=True)


def test_encode_tagged_labels_first_subword(wordpiece):
    words = ["The", "unbelievables", "cat", "sat", "!", "."]
    tags = ["DET", "ADJ", "NOUN", "VERB", "PUNCT", "PUNCT"]
    (enc,) = data.encode_tagged(wordpiece, [words], [tags], max_len=32)
    tokens = [wordpiece.id_to_token(i) for i in enc["input_ids"]]
    assert tokens == ["[CLS]", "the", "un", "##believ", "##able", "##s", "cat", "sat", "[UNK]", ".", "[SEP]"]
    U = data.UPOS_TAGS.index
    assert enc["labels"] == [-100, U("DET"), U("ADJ"), -100, -100, -100, U("NOUN"), U("VERB"), U("PUNCT"),
                             U("PUNCT"), -100]
    assert enc["token_type_ids"] == [0] * len(tokens)
    # integer tags work the same; truncation keeps [SEP] and drops the labels of words cut off
    (short,) = data.encode_tagged(wordpiece, [words], [[U(t) for t in tags]], max_len=5)
    assert [wordpiece.id_to_token(i) for i in short["input_ids"]] == ["[CLS]", "the", "un", "##believ", "[SEP]"]
    assert short["labels"] == [-100, U("DET"), U("ADJ"), -100, -100]
    assert wordpiece.truncation is None and wordpiece.padding is None      # the caller's tokenizer unchanged


def test_encode_pairs_and_content_ids(wordpiece):
    wordpiece.enable_padding(pad_id=0, length=40)        # a caller's setting, restored afterwards
    (single,) = data.encode(wordpiece, ["The cat sat on the mat."], max_len=5)
    assert [wordpiece.id_to_token(i) for i in single["input_ids"]] == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    (pair,) = data.encode(wordpiece, ["the cat sat on the mat ."], max_len=11, pairs=["unbelievables"])
    tokens = [wordpiece.id_to_token(i) for i in pair["input_ids"]]
    # longest first: the 7-token side is cut to 4, the 4-token side is kept whole
    assert tokens == ["[CLS]", "the", "cat", "sat", "on", "[SEP]", "un", "##believ", "##able", "##s", "[SEP]"]
    assert pair["token_type_ids"] == [0] * 6 + [1] * 5
    assert wordpiece.padding["length"] == 40 and wordpiece.truncation is None
    assert data.content_ids(wordpiece, ["the cat sat", "unbelievables"], max_len=3) == [[5, 6, 7], [9, 10, 11]]


def test_encode_rows_single_and_pairs_keep_labels(wordpiece):
    single = data.encode_rows(wordpiece, [{"text": "cat sat", "label": 4}, {"text": "mat", "label": 0}], 16,
                              prefix="the ")
    assert [[wordpiece.id_to_token(i) for i in ex["input_ids"]] for ex in single] == [
        ["[CLS]", "the", "cat", "sat", "[SEP]"], ["[CLS]", "the", "mat", "[SEP]"]]
    assert [ex["label"] for ex in single] == [4, 0]
    (pair,) = data.encode_rows(wordpiece, [{"text_a": "cat", "text_b": "mat", "label": 2}], 16)
    assert [wordpiece.id_to_token(i) for i in pair["input_ids"]] == ["[CLS]", "cat", "[SEP]", "mat", "[SEP]"]
    assert pair["token_type_ids"] == [0, 0, 0, 1, 1] and pair["label"] == 2
    assert data.encode_rows(wordpiece, [], 16) == []


# ----------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------

def test_pad_batch():
    examples = [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "labels": [-100, 4, -100], "label": 1,
                 "text": "a"},
                {"input_ids": [2] + [6] * 8 + [3], "token_type_ids": [0] * 5 + [1] * 5, "labels": [7] * 10,
                 "label": 0, "text": "b"}]
    b = data.pad_batch(examples, pad_id=0)
    assert set(b) == {"input_ids", "token_type_ids", "labels", "label", "attention_mask"}
    assert all(t.dtype == torch.long for t in b.values())
    assert b["input_ids"].shape == (2, 16)                      # 10 rounded up to a multiple of 8
    assert b["input_ids"][0].tolist() == [2, 5, 3] + [0] * 13
    assert b["attention_mask"].sum(1).tolist() == [3, 10]
    assert b["attention_mask"][1].tolist() == [1] * 10 + [0] * 6
    assert b["token_type_ids"][1].tolist() == [0] * 5 + [1] * 5 + [0] * 6
    assert b["labels"][0].tolist() == [-100, 4] + [-100] * 14
    assert b["label"].tolist() == [1, 0]
    assert data.pad_batch(examples, pad_id=0, multiple=1)["input_ids"].shape == (2, 10)
    assert data.pad_batch(examples[:1], pad_id=9)["input_ids"].shape == (1, 8)


def test_bucket_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 129, (1000,), generator=g).tolist()
    batches = data.bucket_batches(lengths, batch_size=16, seed=3, epoch=0, bucket_size=160)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))                    # every index exactly once
    assert all(1 <= len(b) <= 16 for b in batches) and sum(len(b) == 16 for b in batches) >= 1000 // 16 - 7
    assert batches == data.bucket_batches(lengths, 16, seed=3, epoch=0, bucket_size=160)
    assert batches != data.bucket_batches(lengths, 16, seed=3, epoch=1, bucket_size=160)
    assert batches != data.bucket_batches(lengths, 16, seed=4, epoch=0, bucket_size=160)
    for epoch in (1, 2):
        assert sorted(i for b in data.bucket_batches(lengths, 16, 3, epoch) for i in b) == list(range(1000))
    plain = random_batches(1000, 16, seed=3, epoch=0)
    assert sorted(i for b in plain for i in b) == list(range(1000))
    assert plain != random_batches(1000, 16, seed=3, epoch=1)
    bucketed, random = padding_fraction(lengths, batches), padding_fraction(lengths, plain)
    assert bucketed < 0.15 < 0.3 < random


def random_batches(n, batch_size, seed, epoch=0):
    """Plain shuffled batches of range(n), seeded like bucket_batches: the baseline it is measured against."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]


def padding_fraction(lengths, batches, multiple=8):
    """The fraction of positions that pad_batch would fill with padding."""
    total = sum(len(b) * (-(-max(lengths[i] for i in b) // multiple) * multiple) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / total


def test_padding_fraction():
    assert padding_fraction([3, 8, 16], [[0, 1], [2]], multiple=8) == pytest.approx(1 - 27 / 32)


def test_to_device_cpu():
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long)}
    moved = data.to_device(batch, "cpu")
    assert moved["input_ids"].device.type == "cpu" and torch.equal(moved["input_ids"], batch["input_ids"])


# ----------------------------------------------------------------------------------------------------
# masking
# ----------------------------------------------------------------------------------------------------

CLS, PAD, SEP, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = {CLS, PAD, SEP, UNK, MASK}


def random_batch(B, T, vocab_size, seed):
    """[CLS] content [SEP] pad..., content drawn from the non-special ids with some [UNK]s sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < 0.02] = UNK
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    ids[:, 0] = CLS
    ids[pos == (lengths[:, None] - 1)] = SEP
    attention = (pos < lengths[:, None]).long()
    ids[attention == 0] = PAD
    return ids, attention


def test_mask_tokens_statistics():
    ids, attention = random_batch(800, 256, 1000, seed=0)
    original = ids.clone()
    g = torch.Generator().manual_seed(1)
    masked, labels = data.mask_tokens(ids, attention, SPECIALS, MASK, 1000, g)
    assert torch.equal(ids, original)                                  # input not modified
    candidates = (attention == 1) & ~torch.isin(ids, torch.tensor(sorted(SPECIALS)))
    chosen = labels != -100
    assert candidates.sum() > 100_000
    assert not (chosen & ~candidates).any()                            # never a special or a pad
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    n = chosen.sum()
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    replaced = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01
    assert abs(replaced.sum() / n - 0.1) < 0.01
    assert not torch.isin(masked[replaced], torch.tensor(sorted(SPECIALS))).any()
    again = data.mask_tokens(ids, attention, SPECIALS, MASK, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    other = data.mask_tokens(ids, attention, SPECIALS, MASK, 1000, torch.Generator().manual_seed(2))
    assert not torch.equal(other[1], labels)


def test_mask_tokens_random_replacement_never_special():
    # A vocabulary of 5 specials and 2 real tokens: a uniform draw over all ids would hit a special 5/7 of
    # the time. With prob=1 every real position is chosen.
    ids = torch.full((64, 64), 5)
    ids[:, ::2] = 6
    attention = torch.ones_like(ids)
    masked, labels = data.mask_tokens(ids, attention, SPECIALS, MASK, 7, torch.Generator().manual_seed(0),
                                      prob=1.0)
    assert (labels == ids).all()
    assert set(masked.unique().tolist()) == {MASK, 5, 6}
    changed = (masked != ids) & (masked != MASK)
    assert 0.03 < changed.float().mean() < 0.07                       # 10% random, half of them the other id


# ----------------------------------------------------------------------------------------------------
# TLM
# ----------------------------------------------------------------------------------------------------

def test_tlm_example_layout():
    a, b = list(range(10, 20)), list(range(20, 25))
    ex = data.tlm_example(a, b, CLS, SEP, max_len=12)
    # 15 content tokens, room for 9: the longer side is cut to 5, then the tie is broken on b
    assert ex["input_ids"] == [CLS, 10, 11, 12, 13, 14, SEP, 20, 21, 22, 23, SEP]
    assert ex["token_type_ids"] == [0] * 12
    assert data.tlm_example([7, 8], [9], CLS, SEP, max_len=12)["input_ids"] == [CLS, 7, 8, SEP, 9, SEP]
    assert len(data.tlm_example(list(range(5, 300)), list(range(5, 200)), CLS, SEP, 128)["input_ids"]) == 128


def test_tlm_masking_covers_both_sides():
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(64):
        n_a, n_b = torch.randint(10, 40, (2,), generator=g).tolist()
        examples.append(data.tlm_example(torch.randint(5, 1000, (n_a,), generator=g).tolist(),
                                         torch.randint(5, 1000, (n_b,), generator=g).tolist(), CLS, SEP, 64))
    batch = data.pad_batch(examples, pad_id=PAD)
    masked, labels = data.mask_tokens(batch["input_ids"], batch["attention_mask"], SPECIALS, MASK, 1000, g)
    is_sep = (batch["input_ids"] == SEP).long()
    side = is_sep.cumsum(1) - is_sep               # 0 before the first [SEP], 1 up to the second, 2 = pad
    chosen = labels != -100
    assert not chosen[(batch["input_ids"] == CLS) | (is_sep == 1) | (batch["input_ids"] == PAD)].any()
    for s in (0, 1):
        content = (side == s) & (batch["input_ids"] > MASK)
        assert 0.10 < chosen[content].float().mean() < 0.20


def test_download_nusax_brings_the_mt_files_read_nusax_mt_reads(tmp_path, monkeypatch):
    urls = []

    def fake(url, timeout=None):
        urls.append(url)
        return FakeResponse(b"x")
    monkeypatch.setattr(data, "urlopen", fake)
    data.download(tmp_path, which=("nusax",))
    assert len(urls) == 12 * 3 + 3                        # 12 languages x 3 splits of sentiment, + mt/
    for split in ("train", "valid", "test"):
        assert (tmp_path / "nusax" / "mt" / f"{split}.csv").is_file()
        assert any(u.endswith(f"/datasets/mt/{split}.csv") for u in urls)


def test_mask_tokens_same_masks_as_the_uncached_pool():
    """The replacement pool is cached per (specials, vocabulary size): the masks equal those of the code
    that rebuilt it on every call (inlined here), for the same generator, call after call."""
    def old(input_ids, attention_mask, special_ids, mask_id, vocab_size, generator, prob=0.15):
        shape = input_ids.shape
        special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        chosen = torch.bernoulli(torch.full(shape, prob), generator=generator).bool()
        action = torch.rand(shape, generator=generator)
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[special[special < vocab_size]] = False
        pool = allowed.nonzero().squeeze(1)
        random_ids = pool[torch.randint(len(pool), shape, generator=generator)]
        chosen = chosen & attention_mask.bool() & ~torch.isin(input_ids, special)
        labels = torch.where(chosen, input_ids, -100)
        masked = torch.where(chosen & (action < 0.8), mask_id, input_ids)
        return torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked), labels
    ids, attention = random_batch(16, 64, 1000, seed=3)
    g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for vocab_size, specials in ((1000, SPECIALS), (1000, SPECIALS), (700, {CLS, PAD, SEP, UNK, MASK, 800})):
        new = data.mask_tokens(ids, attention, specials, MASK, vocab_size, g_new, prob=0.5)
        ref = old(ids, attention, specials, MASK, vocab_size, g_old, prob=0.5)
        assert torch.equal(new[0], ref[0]) and torch.equal(new[1], ref[1])
