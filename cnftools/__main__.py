"""``python -m cnftools``: the same as the ``cnftools`` console script."""

import sys

from cnftools.cli import main

if __name__ == "__main__":
    sys.exit(main())
