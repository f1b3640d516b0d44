"""``python -m gwq_compile ...``: the same CLI as the ``gwq`` command (see :mod:`gwq_compile.cli`)."""

import sys

from gwq_compile.cli import main

if __name__ == "__main__":
    sys.exit(main())
