"""``python -m ptqd.cli``: the same as the ``ptqd`` command."""

import sys

from ptqd.cli import main

sys.exit(main())
