"""Prepare the text splits of the embedded model from the King James Version of the Bible.

Source: Debian's `bible-kjv-text` package (the public-domain 1611 Authorized Version, read with the
`bible` program of `bible-kjv`):  apt-get install bible-kjv bible-kjv-text
Preparation (deterministic): every verse as one line with its reference ("Ge1:1 ") removed, chapters
in canonical order separated by a blank line; chapter k (0-based) goes to held-out if k % 20 == 7,
to calibration if k % 20 == 17, to train otherwise. Run from the repo root:

    python scripts/prepare_kjv.py src/sparsamba/assets/kjv-text
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

REF = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def chapters() -> list[list[str]]:
    out = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    chaps: list[list[str]] = []
    last = None
    for line in out.splitlines():
        m = REF.match(line)
        if not m:
            continue
        key = (m.group(1), m.group(2))
        if key != last:
            chaps.append([])
            last = key
        chaps[-1].append(m.group(4).strip())
    return chaps


def main(dest: str) -> None:
    chaps = chapters()
    if len(chaps) != 1189:
        sys.exit(f"expected 1189 chapters from `bible`, got {len(chaps)}")
    splits: dict[str, list[str]] = {"train": [], "calib": [], "heldout": []}
    for k, verses in enumerate(chaps):
        name = "heldout" if k % 20 == 7 else "calib" if k % 20 == 17 else "train"
        splits[name].append("\n".join(verses))
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for name, chs in splits.items():
        text = "\n\n".join(chs) + "\n"
        if name == "train":  # the big split ships compressed; mtime 0 keeps the bytes reproducible
            with open(d / "train.txt.gz", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as g:
                g.write(text.encode())
        else:
            (d / f"{name}.txt").write_text(text)
        print(f"{name}: {len(chs)} chapters, {len(text)} characters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "src/sparsamba/assets/kjv-text")
