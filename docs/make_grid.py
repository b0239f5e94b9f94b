"""Draw docs/digits_grid.png: the digit samples and their heatmaps under several composites, each row made by
`onnxlrp explain`. Run from the repository root: `python docs/make_grid.py`."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "fixtures" / "digits" / "samples"
ORDER = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMPOSITES = ["epsilon_plus_flat", "epsilon_plus", "epsilon_alpha2_beta1_flat", "epsilon_gamma_box", "epsilon",
              "zero"]
TITLES = {"zero": "zero (= gradient x input)"}
CELL, LEFT, GAP = 64, 190, 4


def explain(composite: str, outdir: Path) -> None:
    subprocess.run([sys.executable, "-m", "onnxlrp", "explain", str(ROOT / "fixtures" / "digits" / "digits.onnx"),
                    str(SAMPLES), "-o", str(outdir), "--composite", composite], check=True, stdout=subprocess.DEVNULL)


def cell(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)


def main() -> None:
    rows = [("input", [cell(SAMPLES / f"{name}.png") for name in ORDER])]
    with tempfile.TemporaryDirectory() as folder:
        for composite in COMPOSITES:
            explain(composite, Path(folder) / composite)
            cells = [cell(Path(folder) / composite / f"{name}.png") for name in ORDER]
            rows.append((TITLES.get(composite, composite), cells))
    grid = Image.new("RGB", (LEFT + len(ORDER) * (CELL + GAP), len(rows) * (CELL + GAP)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, (title, cells) in enumerate(rows):
        top = r * (CELL + GAP)
        draw.text((6, top + CELL // 2 - 6), title, fill="black", font=font)
        for c, image in enumerate(cells):
            grid.paste(image, (LEFT + c * (CELL + GAP), top))
    grid.save(ROOT / "docs" / "digits_grid.png", optimize=True)
    print(f"wrote docs/digits_grid.png ({np.asarray(grid).shape[1]} x {np.asarray(grid).shape[0]})")


if __name__ == "__main__":
    main()
