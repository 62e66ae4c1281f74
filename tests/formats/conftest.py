"""Make `formats` the package, not this directory.

tests/conftest.py puts tests/ on sys.path, where `formats/` (this directory, no __init__.py)
would import as an empty namespace package ahead of the editable install's finder. Putting the
repository root first lets the real package win.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)
for _name in [m for m in sys.modules if m.split(".")[0] in ("formats", "hv")]:
    if getattr(sys.modules[_name], "__file__", None) is None:  # a namespace stand-in
        del sys.modules[_name]
