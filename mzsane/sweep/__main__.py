"""``python -m mzsane.sweep run-point FILE``: every chart RayJob's entrypoint (mzsane/sweep/point.py)."""
import sys

from mzsane.sweep.point import main

sys.exit(main())
