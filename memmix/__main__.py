"""`python -m memmix ...`: the same command as `memmix ...`."""
import sys

from memmix.cli import main

sys.exit(main())
