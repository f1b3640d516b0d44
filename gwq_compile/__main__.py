"""``python -m gwq_compile ...``: the ``gwq`` command (:mod:`gwq_tools.cli`), kept under the
library's name so that ``torchrun -m gwq_compile quantize ...`` launches distributed calibration."""

import sys

from gwq_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
