"""Sphinx configuration of the jfocal site: `make docs` builds it into docs/_build/html.

Sphinx with myst-nb and the book theme, as optax and flax. Nothing is executed: the
notebooks are rendered with the outputs they were committed with, and every page works
offline (MathJax is served from the site itself, never from a CDN).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import jfocal  # noqa: E402  (autodoc imports it anyway; here for the version and __all__)

project = "jfocal"
author = "The jfocal authors"
copyright = "The jfocal authors"  # noqa: A001  (Sphinx's name)
release = jfocal.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax: no CDN
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", ".gitignore"]
# Single backticks in the docstrings name Python objects: a link where Sphinx knows the
# object, code otherwise (no warning either way).
default_role = "py:obj"

# --- The API reference: one page per public name, from the docstrings ---------------
autosummary_generate = True
autosummary_generate_overwrite = True
autodoc_typehints = "signature"
# The signatures' own names for their types, instead of their expansions.
autodoc_type_aliases = {name: name
                        for name in ("ArrayLike", "Normalizer", "Parameter", "Targets")}
templates_path = ["_templates"]  # autosummary: a page titled by the bare name
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_maximum_signature_line_length = 88  # one parameter per line for long signatures
add_module_names = True

# --- Notebooks: rendered as committed, never executed --------------------------------
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # no widget outputs, and never require.js from a CDN
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --- HTML ------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"jfocal {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "repository_url": "https://github.com/jfocal/jfocal",
    "use_repository_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
# Light by default: the notebooks' figures and the plots have white backgrounds. (An empty
# mode would also make the theme log a console error on a reader's first visit.)
html_context = {"default_mode": "light"}


def _copy_notebooks() -> None:
  """Copies the committed notebooks into the source tree, where Sphinx reads them.

  Only a changed notebook is copied again, so an incremental build stays incremental.
  """
  target = DOCS / "notebooks"
  sources = {path.name: path for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
  for stale in target.glob("*.ipynb"):
    if stale.name not in sources:
      stale.unlink()
  for name, source in sorted(sources.items()):
    copy = target / name
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
      shutil.copyfile(source, copy)


_copy_notebooks()


def _check_api_index(app) -> None:
  """Fails the build when a public name is missing from the API index's groups."""
  from sphinx.errors import ExtensionError

  listed = set(re.findall(r"^ *([a-z_0-9]+)$", (DOCS / "api" / "index.md").read_text(), re.M))
  missing = sorted(set(jfocal.__all__) - listed)
  if missing:
    raise ExtensionError(
        f"docs/api/index.md lists no page for {', '.join(missing)}: add each public name of "
        "jfocal.__all__ to one of the autosummary groups there")


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  """Writes ``ArrayLike | None`` where Sphinx 9 prints an alias in a union by its repr."""
  if signature:
    signature = re.sub(r"TypeAliasForwardRef\('([^']+)'\)", r"\1", signature)
  return signature, return_annotation


def setup(app):
  app.connect("builder-inited", _check_api_index)
  app.connect("autodoc-process-signature", _alias_names)
