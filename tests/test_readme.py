"""The README's Python snippet runs as written, and the README points nowhere outside the project."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import FIXTURES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    (tmp_path / "snippet.py").write_text(snippet)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "snippet.py"))
    printed = capsys.readouterr().out.split()
    assert printed[0] == "three" and printed[1:5] == ["(1,", "1,", "16,", "16)"]
    heat = np.asarray(Image.open(tmp_path / "three_heatmap.png"))
    assert heat.shape == (16, 16, 3) and heat.dtype == np.uint8


def test_readme_points_nowhere_outside_the_project():
    text = README.read_text()
    assert "../" not in text and "shared/" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (README.parent / target).exists(), target
