"""Sphinx configuration (built with -W by ``nox -s docs``)."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

from sphinx.util import logging

project = "dispatch_shard"
author = "the dispatch_shard developers"
copyright = "2026, the dispatch_shard developers"
release = "0.1.0"  # pyproject.toml's [project] version
version = release
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode",
              "sphinx.ext.intersphinx"]
# Type hints go into the signature only. With "description" autodoc adds its own
# Parameters / Return type fields beside the ones the docstrings already have
# (napoleon's), and the page shows both.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
nitpicky = False
html_theme = "furo"
html_title = "dispatch_shard"
html_static_path = ["_static"]
html_css_files = ["tables.css"]
exclude_patterns = ["_build"]
# Bare ``::`` blocks would be highlighted as Python; every Python block is an explicit
# ``.. code-block:: python`` that tests/test_docs_examples.py runs (or a marked fragment).
highlight_language = "text"

_log = logging.getLogger(__name__)

# Links into PyTorch's docs. An offline build (no network, as on CI runners without
# internet) must stay warning-free under -W: sphinx reports an unreachable inventory
# as an untyped warning, which suppress_warnings cannot silence, so the inventory is
# configured only when it can be fetched now (one HEAD request, 5 s at most); otherwise
# the build says so and goes on without those links.
_TORCH_DOCS = "https://docs.pytorch.org/docs/stable/"


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5):
            return True
    except (OSError, ValueError):
        return False


intersphinx_mapping: dict[str, tuple[str, Any]] = {}
if _reachable(_TORCH_DOCS + "objects.inv"):
    intersphinx_mapping["torch"] = (_TORCH_DOCS, None)
    intersphinx_timeout = 10

# Internal ``NOTE [title]`` blocks are for the code's readers (house style: cross-cutting
# points live in NOTE blocks, and comments point at them). They stay in the docstrings
# and are left off the rendered page: a NOTE block runs from its ``NOTE [title]`` line
# to the next NOTE block or the end of the docstring, and a reference to one, ``(NOTE
# [title] in module)`` or ``see NOTE [title]``, is dropped from the sentence.
_NOTE_HEADER = re.compile(r"^NOTE \[[^\]]+\]\s*$")
_NOTE_REFERENCES = [
    # a parenthesis that is only a reference: "(NOTE [x])", "(see NOTE [x] in y)"
    re.compile(r"[ \t]*\((?:see\s+)?NOTE\s+\[[^\]]+\](?:\s+in\s+[\w.:`~/]+)?\)"),
    # a reference closing a longer clause: "..., see NOTE [x]", "...: NOTE [x] in y"
    re.compile(r"[,;:]\s+(?:see\s+)?NOTE\s+\[[^\]]+\](?:\s+in\s+[\w.:`~/]+)?"),
]


def _strip_notes(app: Any, what: str, name: str, obj: Any, options: Any,
                 lines: list[str]) -> None:
    for index, line in enumerate(lines):
        if _NOTE_HEADER.match(line):
            del lines[index:]
            break
    text = "\n".join(lines)
    for pattern in _NOTE_REFERENCES:
        text = pattern.sub("", text)
    if "NOTE [" in text:
        _log.warning("%s: a NOTE reference the docs cannot drop; rephrase it", name)
    lines[:] = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _strip_notes)
    if not intersphinx_mapping:
        _log.info("intersphinx: %sobjects.inv cannot be fetched; building without "
                  "links into PyTorch's docs", _TORCH_DOCS)
