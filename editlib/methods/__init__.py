"""The editing methods: the registry (torch-free), and one module per method holding its
hyperparameter class and its registry entry (rome.py also holds r-ROME; grace/ and mend/ add their
sessions). The locate-and-edit methods share the engine in editlib.editing.

Importing this package registers the built-in methods, in this order.
"""

import importlib

BUILTIN_METHODS = ("rome", "memit", "emmet", "alphaedit", "grace", "mend")  # modules, in registration order

for _module in BUILTIN_METHODS:
    importlib.import_module(f"editlib.methods.{_module}")
