"""The documentation site: it builds, every public name and every page is there, and it renders.

The site is built once per test session (`make docs`'s command, warnings are errors) into a
temporary folder. Two pages, the landing page and the API page of `sigmoid_focal_loss`, are
then opened in headless Chromium (Debian's ``chromium``, driven by playwright; no browser is
downloaded): their formulas must come out typeset by the MathJax the site serves itself, and
the browser must report no console error, no page error and no failed or external request.

Run as a script to refresh the screenshot that the landing page shows:

    .venv/bin/python tests/test_docs_site.py --screenshot
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import html
import http.server
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest

import jfocal

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
# Root on a closed network: no sandbox, no GPU, and none of Chromium's own connections
# (updates, sync, QUIC probes), whose failures would read as the page's.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
BUILD_TIMEOUT_S = 600
SCREENSHOT = DOCS / "_static" / "sigmoid_focal_loss.png"

# Each page the site must have, with words that show its content is there.
PAGES = {
    "index.html": ["pip install", "Quick start", "sigmoid_focal_loss"],
    "api/index.html": ["Sigmoid losses", "Softmax losses", "Large vocabulary",
                       "Class weights", "Checking values at run time"],
    "guarantees.html": ["Numerical guarantees", "Hessian"],
    "bad_input.html": ["What bad input gets", "checked"],
    "migrating.html": ["optax", "torchvision", "mmdetection", "keras", "kornia", "timm",
                       "-100", "alpha=-1", "apply_class_balancing"],
    "data_parallel.html": ["Data-parallel training", "shard_map", "axis_name"],
    "performance.html": ["Performance", "floor kernel"],
    "how_it_works.html": ["How it works", "fence", "folded frame", "custom_jvp"],
    "demo.html": ["RetinaNet", "AP50", "make demo"],
    "development.html": ["make test", "make docs", "registry"],
    "changelog.html": ["Changelog", "0.1.0"],
    "notebooks/index.html": ["Notebooks"],
}
NOTEBOOKS = sorted(path.stem for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def build_site(out: pathlib.Path, strict: bool = True) -> subprocess.CompletedProcess[str]:
  """`make docs`'s build into ``out`` (html/ and doctrees/), warnings as errors if ``strict``."""
  command = [sys.executable, "-m", "sphinx", *(["-W", "--keep-going"] if strict else []),
             "-b", "html", "-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                        timeout=BUILD_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """The built site's html folder; built once per session, shared by pytest-xdist workers."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # the session's folder, above each worker's own
  out, record = shared / "docs_site", shared / "docs_site.json"
  with open(shared / "docs_site.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one worker builds, the others wait for its result
    if not record.exists():
      try:
        result = build_site(out)
        built = {"returncode": result.returncode, "stdout": result.stdout,
                 "stderr": result.stderr}
      except subprocess.TimeoutExpired as error:
        built = {"returncode": "timeout", "stdout": str(error.stdout or ""),
                 "stderr": f"sphinx-build ran past {BUILD_TIMEOUT_S} s"}
      record.write_text(json.dumps(built))
    built = json.loads(record.read_text())
  assert built["returncode"] == 0, (
      f"sphinx-build failed (exit {built['returncode']}); its warnings and errors:\n"
      f"{built['stderr']}\n--- the end of its log:\n{built['stdout'][-3000:]}")
  return out / "html"


def test_the_build_has_no_warnings(site: pathlib.Path) -> None:
  assert (site / "index.html").exists()


@pytest.mark.parametrize("name", sorted(jfocal.__all__))
def test_every_public_name_has_a_page(site: pathlib.Path, name: str) -> None:
  page = site / "api" / "_generated" / f"jfocal.{name}.html"
  assert page.exists(), f"no API page for jfocal.{name}: add it to docs/api/index.md"
  source = page.read_text()
  assert f'id="jfocal.{name}"' in source, f"{page.name} does not document jfocal.{name}"
  text = _text(source)
  assert f"jfocal.{name}(" in text.replace(" ", ""), f"{page.name} lacks the signature"
  docstring = inspect.getdoc(getattr(jfocal, name))
  words = re.match(r"[\w ,-]+", docstring or "")  # the summary's words before any markup
  assert words, f"jfocal.{name} has no docstring"
  summary = words.group(0).strip()
  assert summary in text, f"{page.name} lacks the docstring's summary {summary!r}"
  assert "Args" in text or "Parameters" in text, f"{page.name} lacks the arguments"
  assert f'href="_generated/jfocal.{name}.html"' in (site / "api" / "index.html").read_text()


@pytest.mark.parametrize("page", sorted(PAGES))
def test_each_page_is_there(site: pathlib.Path, page: str) -> None:
  path = site / page
  assert path.exists(), f"the site has no {page}"
  text = _text(path.read_text())
  missing = [word for word in PAGES[page] if word not in text]
  assert not missing, f"{page} lacks {missing}"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_each_notebook_is_rendered_with_its_figures(site: pathlib.Path, notebook: str) -> None:
  page = site / "notebooks" / f"{notebook}.html"
  assert page.exists(), f"notebook {notebook} is not on the site"
  source = page.read_text()
  assert f'href="{notebook}.html"' in (site / "notebooks" / "index.html").read_text()
  figures = [src for src in _image_sources(source) if src.startswith("../_images/")]
  assert figures, f"{notebook} has no figure"
  for src in figures:
    assert (page.parent / src).resolve().is_file(), f"{notebook}: {src} is missing"


@pytest.mark.parametrize("page,image", [("performance.html", "results.png"),
                                        ("demo.html", "training_curves.png"),
                                        ("demo.html", "detections.png"),
                                        ("index.html", "sigmoid_focal_loss.png")])
def test_the_plots_are_on_their_pages(site: pathlib.Path, page: str, image: str) -> None:
  sources = _image_sources((site / page).read_text())
  assert any(src.endswith(image) for src in sources), f"{page} does not show {image}"
  for src in sources:
    assert (site / page).parent.joinpath(src).resolve().is_file(), f"{page}: {src} is missing"


def _image_sources(page: str) -> list[str]:
  return re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)


def _text(page: str) -> str:
  """The text of an HTML page: no tags, entities decoded, whitespace collapsed."""
  text = html.unescape(re.sub(r"<[^>]+>", "", page)).replace("\u2019", "'")
  return re.sub(r"\s+", " ", text)


# --- In a real browser -----------------------------------------------------------------


@contextlib.contextmanager
def serve(directory: pathlib.Path) -> Iterator[str]:
  """Serves ``directory`` on 127.0.0.1 from a thread; yields its base URL."""

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
      pass

  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def chromium() -> Iterator[object]:
  """A headless Debian Chromium under playwright, with a fresh profile; skips without it."""
  if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: `apt-get install chromium` (Debian's package) to "
                "render the site in a browser")
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
  with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as playwright:
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
        viewport={"width": 1200, "height": 900})
    try:
      yield context
    finally:
      context.close()


def render(context, url: str) -> tuple[object, list[str]]:
  """Opens ``url``, waits for MathJax; returns the page and every problem the browser saw."""
  problems: list[str] = []
  page = context.new_page()
  base = url.split("/", 3)[:3]
  local = "/".join(base) + "/"

  def route(route):
    if route.request.url.startswith(local) or route.request.url.startswith("data:"):
      route.continue_()
    else:  # a CDN: the page would not work offline
      problems.append(f"external request: {route.request.url}")
      route.abort()

  page.route("**/*", route)
  page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
          if message.type == "error" else None)
  page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
  page.on("requestfailed", lambda request: problems.append(
      f"request failed: {request.url} ({request.failure})"))
  page.on("response", lambda response: problems.append(
      f"HTTP {response.status}: {response.url}") if response.status >= 400 else None)
  page.goto(url, wait_until="load")
  if page.locator("script[src*='mathjax']").count():  # Sphinx adds it to pages with math
    # MathJax typesets after loading; its startup promise resolves once every formula is done.
    try:
      page.wait_for_function(
          "() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
      page.evaluate("() => MathJax.startup.promise")
    except Exception as error:  # playwright's TimeoutError, or an error inside MathJax
      problems.append(f"MathJax did not typeset the page: {error}")
  page.wait_for_load_state("networkidle")
  return page, problems


@pytest.mark.parametrize("path", ["index.html", "api/_generated/jfocal.sigmoid_focal_loss.html"])
def test_the_page_renders_in_chromium(site: pathlib.Path, path: str) -> None:
  with serve(site) as base, chromium() as context:
    page, problems = render(context, base + path)
    formulas = page.locator("mjx-container").count()
    text = page.locator("article").inner_text()
    broken = page.evaluate(
        "() => [...document.images].filter(i => !i.complete || !i.naturalWidth).map(i => i.src)")
  assert not problems, f"{path}: the browser reported\n" + "\n".join(problems)
  assert formulas > 0, f"{path}: no formula was typeset (no mjx-container)"
  raw = [tex for tex in ("\\frac", "\\alpha", "\\gamma", "\\log", "\\left", "\\(", "\\[")
         if tex in text]
  assert not raw, f"{path}: TeX left untypeset: {raw}"
  assert not broken, f"{path}: images that did not load: {broken}"
  if path.startswith("api/"):
    assert "sigmoid_focal_loss" in text and "gamma" in text


def write_screenshot() -> None:
  """Builds the site and writes the API page of sigmoid_focal_loss to docs/_static."""
  with tempfile.TemporaryDirectory() as out:
    # Not strict: the landing page shows the screenshot, which may not exist yet.
    result = build_site(pathlib.Path(out), strict=False)
    if result.returncode:
      sys.exit(result.stderr)
    with serve(pathlib.Path(out) / "html") as base, chromium() as context:
      page, problems = render(context, base + "api/_generated/jfocal.sigmoid_focal_loss.html")
      if problems:
        sys.exit("\n".join(problems))
      page.screenshot(path=str(SCREENSHOT), full_page=False)
  print(f"wrote {SCREENSHOT.relative_to(ROOT)}")


if __name__ == "__main__":
  if sys.argv[1:] != ["--screenshot"]:
    sys.exit(__doc__)
  write_screenshot()
