"""``python -m cnftools.cli``: the same as the ``cnftools`` command."""

import sys

from cnftools.cli import main

sys.exit(main())
