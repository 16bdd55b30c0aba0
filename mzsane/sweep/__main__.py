"""``python -m mzsane.sweep record-point SRC OUT``: the first step of every chart RayJob."""
import sys

from mzsane.sweep.point import main

sys.exit(main())
