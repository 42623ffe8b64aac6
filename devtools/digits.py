"""A real image folder built offline: scikit-learn's handwritten digits (1,797 real 8x8
scans, shipped with the package) as one folder of 32x32 RGB PNGs per digit, plus a names
file ("0<TAB>zero", ...). Real images whose classes overlap under the demo's CLIP, as real
photos' do, for `dataset=imagefolder` (README, "Calibration on real images").

    python -m devtools.digits data/digits
    recall compose-params dataset=imagefolder dataset.root=data/digits/images \\
        dataset.names_file=data/digits/names.tsv backbone=local_file backbone.arch=recall-tiny \\
        backbone.checkpoint=models/backbone/weights.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digit_images(root: str | Path, size: int = 32) -> tuple[Path, Path]:
    """Write ``root/images/<digit>/<index>.png`` and ``root/names.tsv``; return both paths."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    images = root / "images"
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = images / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((pixels / 16.0 * 255).astype(np.uint8))
        gray.convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
    names = root / "names.tsv"
    names.write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(NAMES)))
    return images, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    images, names = write_digit_images(parser.parse_args().root)
    print(f"wrote {images} and {names}")


if __name__ == "__main__":
    main()
