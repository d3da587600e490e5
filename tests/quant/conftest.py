"""tests/quant share the tiny models of tests/adapters (adapter_testkit.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters"))
