import sys

from mzsane.cli import main

sys.exit(main())
