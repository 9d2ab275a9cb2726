from __future__ import annotations

import sys
from pathlib import Path

# Let tests import their shared helpers (tests/peers.py) under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))
