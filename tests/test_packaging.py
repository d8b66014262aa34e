"""The package as a user installs it: `python -m build` makes an sdist and a wheel, and the wheel,
installed into a fresh virtual environment (not editable), runs the README's quick start from
outside the repository."""

import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

import jfocal

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*command, cwd, **kwargs):
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)
  assert result.returncode == 0, (f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}"
                                  f"\n{result.stderr[-3000:]}")
  return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  """The sdist and the wheel built from the sdist (`python -m build`'s default)."""
  out = tmp_path_factory.mktemp("dist")
  _run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=ROOT)
  (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
  return sdist, wheel


def _quick_start() -> str:
  """The README's quick-start block, run as a user would paste it."""
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## Quick start"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_version_is_written_once():
  assert importlib.metadata.version("jfocal") == jfocal.__version__
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert 'dynamic = ["version"]' in pyproject
  assert not re.search(r"^version\s*=\s*\"", pyproject, re.M), "pyproject.toml writes a version"


def test_sdist_and_wheel_hold_the_whole_package(dist):
  sdist, wheel = dist
  assert wheel.name.startswith(f"jfocal-{jfocal.__version__}-py3-none-any")
  names = set(zipfile.ZipFile(wheel).namelist())
  sources = {str(p.relative_to(ROOT)) for p in (ROOT / "jfocal").rglob("*.py")}
  assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
  assert "jfocal/py.typed" in names
  assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
  metadata = zipfile.ZipFile(wheel).read(
      f"jfocal-{jfocal.__version__}.dist-info/METADATA").decode()
  for field in ("Requires-Dist: jax", "Requires-Dist: optax", "Project-URL: Documentation",
                "Classifier: Typing :: Typed", "Keywords:", "License-Expression: Apache-2.0"):
    assert field in metadata, f"{field!r} missing from the wheel's METADATA"
  with tarfile.open(sdist) as archive:
    members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
  assert {"pyproject.toml", "README.md", "jfocal/py.typed", "jfocal/engine/vocab.py"} <= members


def test_the_wheel_in_a_fresh_environment_runs_the_quick_start(dist, tmp_path):
  _, wheel = dist
  env = tmp_path / "env"
  venv.create(env, with_pip=True)
  python = env / "bin" / "python"
  _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
  # The dependencies (jax, optax, ...) come from the suite's environment, appended to the fresh
  # one's path, so that nothing is downloaded; jfocal itself can only be the wheel's: the
  # suite's editable install is a path hook that a plain .pth entry does not run.
  site = _run(python, "-c", "import site; print(site.getsitepackages()[0])", cwd=tmp_path)
  deps = pathlib.Path(importlib.metadata.distribution("jax").locate_file(""))
  (pathlib.Path(site.strip()) / "suite_dependencies.pth").write_text(f"{deps}\n")
  _run(python, "-m", "pip", "check", cwd=tmp_path)
  script = tmp_path / "quick_start.py"
  script.write_text(_quick_start() + "\nimport jfocal, pathlib\n"
                    "print(pathlib.Path(jfocal.__file__).resolve())\n"
                    "print(jfocal.__version__, float(loss))\n")
  out = _run(python, "-I", script, cwd=tmp_path).split()
  location, version, loss = out[-3:]
  assert pathlib.Path(location).is_relative_to(env), f"jfocal imported from {location}"
  assert version == jfocal.__version__
  assert float(loss) >= 0
