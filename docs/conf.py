"""Sphinx configuration (built with -W by ``nox -s docs``)."""

from __future__ import annotations

project = "dispatch_shard"
author = "the dispatch_shard developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
nitpicky = False
html_theme = "furo"
exclude_patterns = ["_build"]
