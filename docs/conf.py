"""Sphinx configuration of the mumoe documentation."""

import mumoe

project = "mumoe"
author = "mumoe developers"
copyright = "2026, mumoe developers"
release = mumoe.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
]

autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
autodoc_typehints = "none"
default_role = "code"

intersphinx_mapping = {}  # no network at build time

html_theme = "pydata_sphinx_theme"
html_title = "mumoe"
html_static_path = ["_static"]
exclude_patterns = ["_build"]
nitpicky = False
