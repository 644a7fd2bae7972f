"""The docs site builds from the repository with ``mkdocs build --strict``: a broken link or
anchor, a page missing from the navigation, a missing included file or a public function without
a docstring fails it. The README stays a front page."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from project_home import REPO

MKDOCS = Path(sys.executable).parent / "mkdocs"


def test_the_docs_site_builds_strictly(tmp_path):
    # NO_MKDOCS_2_WARNING: the banner MkDocs 1.6 prints about its successor on every build.
    result = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                              "PATH": str(MKDOCS.parent)})
    assert result.returncode == 0, result.stderr[-4000:]
    built = (tmp_path / "site" / "reference" / "spark" / "index.html").read_text(encoding="utf-8")
    # The API reference is generated from the docstrings.
    assert "The active Spark session, the one" in built


def test_the_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    linked = {line.split("](docs/", 1)[1].split(")", 1)[0] for line in readme.splitlines() if "](docs/" in line}
    assert linked and all((REPO / "docs" / page).is_file() for page in linked), linked
