"""The numerical experiments behind ``cnftools validate``: one module per theorem or claim.

Installed as :mod:`cnftools.validation` (the folder ``validation/`` at the repository root is mapped
onto that package name). Every module whose name does not start with ``_`` is an experiment: it
defines ``SECTION`` (the the theory pages (docs/theory/) section number it checks, used for ordering), ``TITLE`` and
``run(ctx: Context) -> Iterable[Check]``. The CLI discovers them; adding a file adds rows.
"""

from cnftools.validation._framework import (
    Check,
    Context,
    Run,
    discover,
    run_experiments,
    write_report,
)

__all__ = ["Check", "Context", "Run", "discover", "run_experiments", "write_report"]
