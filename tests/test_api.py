"""The public Python API: lazy re-exports, and the README's "From Python" example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

import cars_tl


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_public_name_resolves_to_a_callable():
    for name in cars_tl._API:
        assert callable(getattr(cars_tl, name)), name
    with pytest.raises(AttributeError):
        cars_tl.no_such_thing  # noqa: B018


def test_import_cars_tl_imports_no_torch():
    code = "import sys, cars_tl; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_the_readme_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", _readme_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["6", "144"]  # the demo: 6 classes, 144 training images
    assert lines[1].startswith("(144, 512)")  # resnet18 pooled features of every training image
    assert 0.0 <= float(lines[2]) <= 100.0 and lines[3] == "svm 6"
    assert (tmp_path / "work" / "runs" / "B-head" / "metrics.json").is_file()
