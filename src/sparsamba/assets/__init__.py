"""Files shipped inside the package: the embedded default model and its text splits."""

from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_MODEL = HERE / "kjv-mamba-tiny"  # HF-format directory, trained by `sparsamba train-tiny`
KJV_TEXT = HERE / "kjv-text"  # train.txt.gz / calib.txt / heldout.txt, see its README.md
CALIB = KJV_TEXT / "calib.txt"
HELDOUT = KJV_TEXT / "heldout.txt"
