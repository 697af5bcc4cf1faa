"""The source distribution holds what a build needs: the C++/CUDA sources and headers, the assets, LICENSE.

Built with ``setup.py sdist`` into a temporary folder (a few seconds, no compiler); the full
sdist -> wheel -> fresh environment -> ``colorquant demo`` round trip is in the README's
"Installing" section and was checked by hand (it compiles the extension).
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    out = tmp_path_factory.mktemp("sdist")
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "COLORQUANT_CPU_ONLY": "1"})
    assert result.returncode == 0, result.stderr
    assert "is absent from the `packages` configuration" not in result.stderr, result.stderr
    (archive,) = out.glob("colorquant_ops-*.tar.gz")
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    prefix = names[0].split("/")[0]
    return {name[len(prefix) + 1:] for name in names if "/" in name}


def test_sdist_has_every_source_and_header(sdist_names):
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= sdist_names, sorted(sources - sdist_names)


def test_sdist_has_license_assets_and_packages(sdist_names):
    assert {"LICENSE", "setup.py", "pyproject.toml", "README.md"} <= sdist_names
    assert "colorquant_ops/assets/weights/colorcnn-k2.pt" in sdist_names
    assert len([n for n in sdist_names if n.startswith("colorquant_ops/assets/cifar10-sample/test/")
                and n.endswith(".jpg")]) == 500
    for module in ("colorquant_ops/experiment/cli.py", "colorquant_ops/experiment/data/archives.py",
                   "colorquant_ops/models/pretrained.py"):
        assert module in sdist_names
    assert not [n for n in sdist_names if n.endswith(".so") or "__pycache__" in n]
