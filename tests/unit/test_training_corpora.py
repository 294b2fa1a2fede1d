"""Training corpora from Debian packages: every extractor on formats built here, dedup, splits, manifest.

The packages are tiny fake ``.deb`` files built with ``dpkg-deb --build`` and placed in the downloads folder,
so :func:`download_deb` reuses them and nothing is fetched. One test (skipped unless
``LATENT_ATLAS_NETWORK=1``) fetches the real ``fortunes`` package with ``apt-get download``.
"""

import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from latent_atlas.corpus import COLUMNS, load_corpus_table
from latent_atlas.errors import CorpusError
from latent_atlas.training import debian
from latent_atlas.training.debian import (
    Settings,
    Source,
    assemble_corpus,
    download_deb,
    extract_deb,
    parse_sources,
    read_sources_config,
)
from latent_atlas.training.extractors.dictd import dictd_b64_decode, dictd_b64_encode, extract_dictd, read_dictd
from latent_atlas.training.extractors.fortunes import extract_fortunes
from latent_atlas.training.extractors.html import html_to_text
from latent_atlas.training.extractors.kjv import extract_kjv, read_kjv, unlzw
from latent_atlas.training.extractors.man import groff_to_text
from latent_atlas.training.text import (
    assign_split,
    chunk_text,
    clean_text,
    exact_duplicates,
    near_duplicates,
    parent_document,
    word_count,
)

REPO = Path(__file__).resolve().parents[2]
needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed (Debian/Ubuntu package dpkg)"
)

# --------------------------------------------------------------------------------------------------
# Writers for the package formats, independent of the readers under test

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(value: int) -> str:
    digits = ""
    while True:
        digits = ALPHABET[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def lzw_compress(data: bytes, max_bits: int = 16) -> bytes:
    """Unix ``compress`` in block mode (no CLEAR codes), as a raw stream without the 3-byte header."""
    table = {bytes([i]): i for i in range(256)}
    free, n_bits, max_code, limit = 257, 9, 511, 1 << max_bits
    acc = pos = group_start = 0
    word = b""
    for byte in data:
        extended = word + bytes([byte])
        if extended in table:
            word = extended
            continue
        acc |= table[word] << pos
        pos += n_bits
        if free > max_code:  # compress widens after writing the code that fills the table's width
            width = n_bits * 8
            pos = group_start + math.ceil((pos - group_start) / width) * width
            group_start = pos
            n_bits += 1
            max_code = limit if n_bits == max_bits else (1 << n_bits) - 1
        if free < limit:
            table[extended] = free
            free += 1
        word = bytes([byte])
    if word:
        acc |= table[word] << pos
        pos += n_bits
    return acc.to_bytes((pos + 7) // 8, "little")


def kjv_data(text: str, window: int) -> bytes:
    """A ``bible.data`` file in the Bible Retrieval System format, with ``window`` bytes per window."""
    raw = text.encode("latin-1")
    windows = [lzw_compress(raw[i : i + window]) for i in range(0, len(raw), window)]
    header = b"EC02Compressed Data File".ljust(0x54, b"\0")
    header += window.to_bytes(4, "big") + len(windows).to_bytes(4, "big")
    start = len(header) + 4 * (len(windows) + 1) + 3
    offsets = [start]
    for compressed in windows:
        offsets.append(offsets[-1] + len(compressed))
    header += b"".join(offset.to_bytes(4, "big") for offset in offsets)
    return header + b"\x1f\x9d\x90" + b"".join(windows)


def dictd_files(entries: list[tuple[str, str]], folder: Path, name: str) -> None:
    """Write ``name.dict.dz`` (gzip) and ``name.index`` (headword, offset, length in dictd base 64)."""
    body, index = b"", []
    info = b"00-database-info\n     This is a test database.\n"
    index.append(f"00-database-info\t{b64(0)}\t{b64(len(info))}")
    body += info
    for headword, definition in entries:
        data = definition.encode()
        index.append(f"{headword}\t{b64(len(body))}\t{b64(len(data))}")
        body += data
    index.sort(key=lambda line: line.lower())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(body))
    (folder / f"{name}.index").write_text("\n".join(index) + "\n")


KJV_TEXT = "\n".join(
    [
        "Holy Bible, Authorized (King James) Version.  Textfile 930105.",
        "Ge1:1 In the beginning God created the heaven and the earth.",
        "Ge1:2 And the earth was without form, and void; and darkness was upon the face of the deep.",
        "Ge1:3 And God said, Let there be light: and there was light.",
        "Ge2:1 Thus the heavens and the earth were finished, and all the host of them.",
        "Ge2:2 And on the seventh day God ended his work which he had made.",
        "Psa23:1 The LORD is my shepherd; I shall not want.",
        "Psa23:2 He maketh me to lie down in green pastures: he leadeth me beside the still waters.",
    ]
)
DICT_ENTRIES = [
    ("apple", "apple\n   n. The fleshy fruit of a rosaceous tree. {Malus}\n   [1913 Webster]\n\n"),
    ("banana", "banana\n   n. An elongated yellow fruit of a tropical plant.\n\n"),
    ("cherry", "cherry\n   n. A small round stone fruit, red or black when ripe.\n\n"),
    ("damson", "damson\n   n. A small dark purple plum, often used for jam.\n\n"),
]
MAN_PAGE = r""".\" Copyright (c) 2024 Test
.TH TOY 7 2024-01-01 "Test pages"
.SH NAME
toy \- a toy page for the \fBextractor\fP tests
.SH DESCRIPTION
The
.B toy
program reads
.IR input ,
writes
.BR output (5),
and prints \(lqhello\(rq \(em then stops.
.PP
.TP
.B \-v
Print more\e messages.
.IP \(bu 2
A bullet item.
.EX
int main(void) { return 0; }
.EE
.TS
l l.
cell	value
.TE
.SH SEE ALSO
.BR other (1)
"""
HTML_PAGE = """<!DOCTYPE html><html><head><title>Guide</title><style>p {color: red}</style></head>
<body><div class="related" role="navigation"><a href="x.html">previous</a> | <a href="y.html">next</a></div>
<div class="body" role="main"><h1>Installing things<a class="headerlink" href="#a">¶</a></h1>
<p>First open a terminal &amp; type the command shown below,
then press Enter.</p><pre>$ make install</pre><ul><li>Check the <code>PATH</code>.</li></ul></div>
<div class="footer">Copyright 2024.</div><script>var x = 1;</script></body></html>"""
FORTUNES = (
    "A bird in the hand is worth two in the bush.\n%\n"
    "Roses are red,\n  violets are blue.\n\t\t-- Anon\n%\n"
    "A bird in the hand is worth two in the bush.\n%\n"
)


def build_deb(root: Path, package: str, version: str, files: dict[str, bytes | str], licence: str, out: Path) -> Path:
    """Build ``<package>_<version>_all.deb`` (epoch written as ``%3a``, as apt does) with ``files`` inside."""
    tree = root / f"{package}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <test@example.org>\n"
        f"Description: test package {package}\n"
    )
    files = {**files, f"usr/share/doc/{package}/copyright": f"Format: test\n\nFiles: *\nLicense: {licence}\n"}
    for relative, content in files.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"{package}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)], check=True, capture_output=True
    )
    return deb


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A downloads folder holding five fake packages, one per extractor."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian/Ubuntu package dpkg)")
    root = tmp_path_factory.mktemp("debs")
    out = root / "downloads"
    dict_dir = root / "dict"
    dictd_files(DICT_ENTRIES, dict_dir, "fruit")
    build_deb(root, "fake-kjv", "4.38", {"usr/lib/bible.data": kjv_data(KJV_TEXT, 128)}, "public-domain", out)
    build_deb(
        root,
        "fake-dict",
        "0.1-1",
        {
            "usr/share/dictd/fruit.dict.dz": (dict_dir / "fruit.dict.dz").read_bytes(),
            "usr/share/dictd/fruit.index": (dict_dir / "fruit.index").read_text(),
        },
        "GPL-2+",
        out,
    )
    build_deb(root, "fake-man", "6.03-2", {"usr/share/man/man7/toy.7.gz": gzip.compress(MAN_PAGE.encode())}, "MIT", out)
    build_deb(root, "fake-html", "2.100", {"usr/share/doc/fake/guide.html": HTML_PAGE}, "GPL-2", out)
    build_deb(
        root,
        "fake-fortunes",
        "1:1.99",
        {
            "usr/share/games/fortunes/wisdom": FORTUNES,
            "usr/share/games/fortunes/wisdom.dat": b"\0\0\0\2binary",
            "usr/share/games/fortunes/off/rude": "An offensive joke that must never appear.\n%\n",
        },
        "BSD-3-Clause",
        out,
    )
    return out


def _sources() -> list[dict]:
    return [
        {"package": "fake-kjv", "register": "narrative", "extractor": "kjv", "paths": ["usr/lib/bible.data"],
         "licence": "public-domain"},
        {"package": "fake-dict", "register": "informational_description", "extractor": "dictd",
         "paths": ["usr/share/dictd/*.dict.dz"], "licence": "GPL-2+",
         "options": {"drop_patterns": [r"\[1913 Webster\]"]}},
        {"package": "fake-man", "register": "how_to", "extractor": "man", "paths": ["usr/share/man/man*/*.gz"],
         "licence": "MIT", "options": {"drop_sections": ["SEE ALSO"]}},
        {"package": "fake-html", "register": "how_to", "extractor": "html", "paths": ["usr/share/doc/fake/*.html"],
         "licence": "GPL-2", "options": {"content": "body"}},
        {"package": "fake-fortunes", "register": "aphorism", "extractor": "fortunes",
         "paths": ["usr/share/games/fortunes/**/*"], "licence": "BSD-3-Clause"},
    ]  # fmt: skip


SETTINGS = {"min_words": 3, "max_words": 40, "group_words": 20, "split_salt": "test"}


def _root(downloads: Path, package: str, tmp_path: Path) -> Path:
    return extract_deb(download_deb(package, downloads), tmp_path / package)


# --------------------------------------------------------------------------------------------------
# Formats


def test_dictd_base64_numbers():
    assert dictd_b64_decode("A") == 0
    assert dictd_b64_decode("B") == 1
    assert dictd_b64_decode("BA") == 64
    assert dictd_b64_decode("Bd") == 93
    assert dictd_b64_decode("/") == 63
    for value in (0, 1, 63, 64, 93, 4095, 4096, 123456789):
        assert dictd_b64_decode(b64(value)) == value
        assert dictd_b64_encode(value) == b64(value)
    with pytest.raises(CorpusError, match="base-64"):
        dictd_b64_decode("a-b")


def test_unlzw_reads_what_compress_writes():
    text = " ".join(f"verse {i} and the word of line {i * 7 % 13}" for i in range(900)).encode()
    compressed = lzw_compress(text)
    assert len(compressed) < len(text) / 2  # the codes widen past 9 bits here
    assert unlzw(compressed) == text
    if shutil.which("gzip"):  # gzip reads .Z files: check the test's own compressor against it
        result = subprocess.run(["gzip", "-dc"], input=b"\x1f\x9d\x90" + compressed, capture_output=True, check=True)
        assert result.stdout == text


def test_kjv_file_chapters_and_book_filters(tmp_path):
    path = tmp_path / "bible.data"
    path.write_bytes(kjv_data(KJV_TEXT, 100))
    assert read_kjv(path) == KJV_TEXT
    chapters = list(extract_kjv([path], {}))
    assert len(chapters) == 3
    assert chapters[0] == (
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. And God said, Let there be light: and there was light."
    )
    assert list(extract_kjv([path], {"books": ["Psa"]})) == [
        "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me "
        "beside the still waters."
    ]
    assert len(list(extract_kjv([path], {"exclude_books": ["Psa"]}))) == 2
    (tmp_path / "bad.data").write_bytes(b"not a bible")
    with pytest.raises(CorpusError, match="not a bible-kjv-text data file"):
        read_kjv(tmp_path / "bad.data")


def test_dictd_entries_recovered_exactly_through_the_index(tmp_path):
    dictd_files(DICT_ENTRIES, tmp_path, "fruit")
    entries = list(read_dictd(tmp_path / "fruit.dict.dz"))
    assert [headwords for headwords, _ in entries] == [["apple"], ["banana"], ["cherry"], ["damson"]]
    assert entries[2][1] == DICT_ENTRIES[2][1]
    documents = list(
        extract_dictd([tmp_path / "fruit.dict.dz"], {"group_words": 12, "drop_patterns": [r"\[1913 Webster\]"]})
    )
    assert documents[0] == (
        "apple n. The fleshy fruit of a rosaceous tree. Malus\n\n"
        "banana n. An elongated yellow fruit of a tropical plant."
    )
    assert "00-database" not in " ".join(documents) and "test database" not in " ".join(documents)


def test_man_page_macros_and_escapes_stripped():
    text = groff_to_text(MAN_PAGE, drop_sections=["see also"])
    paragraphs = text.split("\n\n")
    assert paragraphs[:3] == ["NAME", "toy - a toy page for the extractor tests", "DESCRIPTION"]
    assert "The toy program reads input, writes output(5), and prints “hello” — then stops." in paragraphs
    assert "-v" in paragraphs and "Print more\\ messages." in paragraphs
    assert "• A bullet item." in paragraphs
    for gone in ("int main", "cell", "SEE ALSO", "other(1)", "\\f", ".TH", "Copyright", "\\-"):
        assert gone not in text
    assert "int main(void) { return 0; }" in groff_to_text(MAN_PAGE, keep_code=True)
    assert groff_to_text(".so man7/other.7\n") == ""


def test_html_page_to_text_without_navigation_or_code():
    text = html_to_text(HTML_PAGE, content="body")
    assert text == (
        "Installing things\n\n"
        "First open a terminal & type the command shown below, then press Enter.\n\n"
        "Check the PATH."
    )
    whole = html_to_text(HTML_PAGE)
    assert "Installing things" in whole
    assert "previous" not in whole and "var x" not in whole and "color" not in whole and "Copyright" not in whole
    assert "$ make install" in html_to_text(HTML_PAGE, keep_code=True)


def test_fortunes_split_grouped_and_offensive_skipped(tmp_path):
    (tmp_path / "off").mkdir()
    (tmp_path / "wisdom").write_text(FORTUNES)
    (tmp_path / "off" / "rude").write_text("An offensive joke.\n%\n")
    documents = list(extract_fortunes([tmp_path / "wisdom", tmp_path / "off" / "rude"], {"group_words": 1000}))
    assert documents == [
        "A bird in the hand is worth two in the bush.\n\nRoses are red,\n  violets are blue.\n\t\t-- Anon"
    ]
    assert len(list(extract_fortunes([tmp_path / "wisdom"], {"group_words": 5}))) == 2


# --------------------------------------------------------------------------------------------------
# Cleaning, cutting, deduplication, splits


def test_clean_text_normalises():
    raw = "Cafe\u0301  au\tlait\x07\r\nB\bBold   line  \n\n\n\nnext\u200b para  "
    assert clean_text(raw) == "Café au lait\nBold line\n\nnext para"


def test_chunk_text_respects_max_words_and_keeps_every_word():
    paragraphs = [" ".join(f"w{p}x{i}" + ("." if i % 9 == 8 else "") for i in range(37)) for p in range(5)]
    text = "\n\n".join(paragraphs)
    pieces = chunk_text(text, 50)
    assert all(word_count(piece) <= 50 for piece in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert len(pieces) == math.ceil(word_count(text) / 50) + 1  # 185 words: paragraph ends limit the packing
    assert chunk_text("short text", 50) == ["short text"]
    assert all(word_count(p) <= 7 for p in chunk_text(" ".join(["word"] * 30), 7))


def test_dedup_removes_exact_and_near_duplicates_keeps_distinct():
    base = " ".join(f"token{i}" for i in range(200))
    near = base.replace("token100", "changed")
    texts = [
        base,
        "Totally different text about " + " ".join(f"other{i}" for i in range(200)),
        base.upper().replace(" ", "  "),  # exact after normalisation
        near,  # one word in 200 changed
        " ".join(f"token{i}" for i in range(100)) + " " + " ".join(f"fresh{i}" for i in range(100)),  # half
    ]
    exact = exact_duplicates(texts)
    assert exact == [False, False, True, False, False]
    near_flags = near_duplicates(texts, threshold=0.8, skip=exact)
    assert near_flags == [False, False, False, True, False]
    assert near_duplicates(texts, threshold=0.8, skip=exact) == near_flags  # deterministic


def test_splits_stable_by_document_and_fractions_respected():
    fractions = {"train": 0.9, "validation": 0.05, "test": 0.05}
    ids = [f"deb:src:{n}" for n in range(4000)]
    first = [assign_split(i, fractions, "salt") for i in ids]
    assert first == [assign_split(i, fractions, "salt") for i in ids]
    counts = {split: first.count(split) / len(ids) for split in fractions}
    assert counts["train"] == pytest.approx(0.9, abs=0.02) and counts["test"] == pytest.approx(0.05, abs=0.015)
    assert parent_document("deb:python3.11-doc:12.3") == "deb:python3.11-doc:12"
    assert parent_document("deb:x:7") == "deb:x:7"


# --------------------------------------------------------------------------------------------------
# Packages and the whole assembly


def test_extract_deb_unpacks(downloads, tmp_path):
    root = _root(downloads, "fake-dict", tmp_path)
    assert (root / "usr/share/dictd/fruit.index").is_file()
    assert extract_deb(downloads / "fake-dict_0.1-1_all.deb", root) == root  # reused


def test_assemble_corpus_end_to_end(downloads, tmp_path):
    out, manifest_path = tmp_path / "corpus.parquet", tmp_path / "manifest.json"
    manifest = assemble_corpus(_sources(), SETTINGS, downloads, out, manifest_path)
    table, meta = load_corpus_table(out)
    assert table.columns == list(COLUMNS)
    assert meta["corpus_sha256"] == manifest["corpus_sha256"] and meta["n_docs"] == table.height
    assert json.loads(manifest_path.read_text())["corpus_sha256"] == manifest["corpus_sha256"]
    assert set(table["label"]) == {"narrative", "informational_description", "how_to", "aphorism"}
    assert set(table["source"]) == {"fake-kjv", "fake-dict", "fake-man", "fake-html", "fake-fortunes"}
    assert all(word_count(text) <= SETTINGS["max_words"] for text in table["text"])
    assert table["doc_id"].n_unique() == table.height
    text = "\n".join(table["text"])
    assert "offensive" not in text and "[1913 Webster]" not in text and "int main" not in text
    assert text.count("A bird in the hand") == 1

    parents = table.with_columns(pl.col("doc_id").map_elements(parent_document, return_dtype=pl.String).alias("p"))
    assert parents.group_by("p").agg(pl.col("split").n_unique().alias("n"))["n"].max() == 1

    kjv = manifest["sources"]["fake-kjv"]
    deb = downloads / "fake-kjv_4.38_all.deb"
    assert kjv["deb_sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert kjv["version"] == "4.38" and kjv["licence"] == "public-domain" and kjv["register"] == "narrative"
    assert kjv["copyright_file"] == "usr/share/doc/fake-kjv/copyright"
    assert "License: public-domain" in kjv["copyright_excerpt"]
    assert Path(kjv["copyright_path"]).read_text().startswith("Format: test")
    assert manifest["sources"]["fake-fortunes"]["version"] == "1:1.99"
    assert manifest["sources"]["fake-dict"]["licences_declared"] == ["GPL-2+"]  # from its License: field
    assert sum(s["words"] for s in manifest["registers"].values()) == manifest["totals"]["words"]
    assert manifest["totals"]["documents"] == table.height
    assert manifest["settings"]["max_words"] == SETTINGS["max_words"] and "code_version" in manifest["provenance"]

    again = assemble_corpus(_sources(), SETTINGS, downloads, tmp_path / "again.parquet", tmp_path / "again.json")
    assert again["corpus_sha256"] == manifest["corpus_sha256"]  # stable across runs
    assert load_corpus_table(tmp_path / "again.parquet")[0].equals(table)


def test_register_cap_balances(downloads, tmp_path):
    capped = assemble_corpus(
        _sources(), {**SETTINGS, "max_words_per_register": 50}, downloads, tmp_path / "c.parquet", tmp_path / "c.json"
    )
    assert all(register["words"] <= 50 for register in capped["registers"].values())
    assert sum(s["dropped"].get("register_cap", 0) for s in capped["sources"].values()) > 0


def test_shipped_config_parses():
    sources, settings = read_sources_config(REPO / "config/training/debian-sources.yaml")
    registers = {source.register for source in sources}
    assert {"narrative", "informational_description", "how_to", "lyrical"} <= registers
    assert sum(settings.splits.values()) == pytest.approx(1.0)
    assert all(isinstance(source, Source) and source.licence for source in sources)
    assert isinstance(settings, Settings)


# --------------------------------------------------------------------------------------------------
# Errors


def test_unknown_extractor_and_bad_sources_named():
    with pytest.raises(CorpusError, match=r"extractor 'pdf'.*dictd, fortunes, html, kjv, man"):
        parse_sources([{**_sources()[0], "extractor": "pdf"}])
    with pytest.raises(CorpusError, match="missing licence"):
        parse_sources([{k: v for k, v in _sources()[0].items() if k != "licence"}])
    with pytest.raises(CorpusError, match="used twice"):
        parse_sources([_sources()[0], _sources()[0]])
    with pytest.raises(CorpusError, match="sum to 1"):
        assemble_corpus(_sources(), {"splits": {"train": 0.5}}, "unused", "x.parquet", "x.json")


def test_unknown_package_named(tmp_path):
    with pytest.raises(CorpusError, match="latent-atlas-no-such-package"):
        download_deb("latent-atlas-no-such-package", tmp_path)


def test_missing_apt_get_named(tmp_path, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match=r"`apt-get` is not installed.*'fortunes'"):
        download_deb("fortunes", tmp_path)


def test_paths_matching_nothing_named(downloads, tmp_path):
    sources = [{**_sources()[0], "paths": ["usr/lib/nothing-here"]}]
    with pytest.raises(CorpusError, match=r"no files in package fake-kjv match \['usr/lib/nothing-here'\]"):
        assemble_corpus(sources, SETTINGS, downloads, tmp_path / "x.parquet", tmp_path / "x.json")


# --------------------------------------------------------------------------------------------------
# The real package (network)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENT_ATLAS_NETWORK") != "1", reason="set LATENT_ATLAS_NETWORK=1 to fetch")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_real_fortunes_package(tmp_path):
    deb = download_deb("fortunes", tmp_path / "downloads")
    root = extract_deb(deb, tmp_path / "fortunes")
    files = sorted((root / "usr/share/games/fortunes").iterdir())
    documents = list(extract_fortunes([f for f in files if f.is_file() and not f.is_symlink()], {"group_words": 300}))
    words = sum(word_count(document) for document in documents)
    assert len(documents) > 1000 and words > 300_000
    assert (root / "usr/share/doc/fortunes/copyright").is_file()


def test_a_family_fetches_only_the_sources_of_its_registers():
    from latent_atlas.training.debian import Source, sources_for_registers

    sources = [
        Source("bible-kjv-text", "narrative", "kjv", ("usr/lib/bible.data",), "public-domain"),
        Source("manpages", "how_to", "man", ("usr/share/man/**",), "GPL"),
    ]
    assert [s.package for s in sources_for_registers(sources, ["how_to"], "x.yaml")] == ["manpages"]
    with pytest.raises(CorpusError, match=r"names \['poetry'\], which no source in x.yaml provides"):
        sources_for_registers(sources, ["how_to", "poetry"], "x.yaml")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"min_words": "5"}, r"settings\.min_words is '5' \(str\)"),
        ({"max_words_per_register": 2.5}, r"settings\.max_words_per_register is 2\.5"),
        ({"near_duplicate_threshold": 1.5}, r"near_duplicate_threshold is 1\.5; use a value in \(0, 1\]"),
        ({"max_words_per_register": 0}, r"max_words_per_register must be at least 1"),
    ],
)
def test_settings_of_the_wrong_type_or_range_are_named(values, message):
    from latent_atlas.training.debian import parse_settings

    with pytest.raises(CorpusError, match=message):
        parse_settings(values)
