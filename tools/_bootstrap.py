"""Lets `python tools/<tool>.py` run from a source checkout where the package is not installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
