import sys
from pathlib import Path

# test helper modules (tiny guests, etc.) import as top-level names
sys.path.insert(0, str(Path(__file__).parent / "hv"))
