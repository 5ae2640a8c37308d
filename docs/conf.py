"""Sphinx configuration of the mumoe documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``: warnings are
errors, the tutorials in ``examples/`` are executed (sphinx-gallery), every
``.. plot::`` is drawn, and MathJax is served from the build itself (no
network needed to read the pages).
"""

import os

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
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # the package's module name has hyphens
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
]

autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
autodoc_typehints = "none"
default_role = "code"

plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py",  # execute every tutorial, not only plot_*.py
    "within_subsection_order": "FileNameSortKey",  # 01_..., 02_..., in reading order
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "min_reported_time": 1,
}

# Tutorials seed their own generators; keep BLAS and torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")

html_theme = "pydata_sphinx_theme"
html_title = "mumoe"
html_static_path = ["_static"]
html_css_files = ["mumoe.css"]
html_theme_options = {"navigation_with_keys": False}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
nitpicky = False

# Every public docstring documents its parameters and what it returns, with an example.
numpydoc_validation_checks = {"PR01", "PR02", "PR10", "RT01", "EX01"}
# Hypothesis's @composite wrappers have no source for numpydoc to inspect.
numpydoc_validation_exclude = {
    r"\.__\w+__$",
    r"\._\w+$",
    r"^mumoe\.testing\.(preset_networks|custom_specs|custom_networks)$",
    # What torch.nn.Module, dict and tuple give the classes; their own methods are checked.
    r"^mumoe\.nn\.(compat\.)?\w+\.(?!forward$|materialize$|expert_weight$|reset_parameters$)\w+$",
    r"^mumoe\.nn\.GateRecord\.",
    r"^mumoe\.functional\.ExpertWeight\.(count|index|weight|bias)$",  # tuple; fields documented
}
