"""The README's Python snippets run as written."""

import pathlib
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading_text: str) -> str:
    text = README.read_text()
    start = text.index("```python\n", text.index(heading_text)) + len("```python\n")
    return text[start : text.index("```\n", start)]


@pytest.mark.parametrize(
    "after, prints",
    [
        ("## Training with a fused optimizer", "loss after 100 steps: "),
        ("The same run from Python:", "planted: "),
    ],
)
def test_readme_snippet_runs_as_written(tmp_path, after, prints):
    code = python_block_after(after)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert prints in done.stdout
