"""``python -m dmr_operator`` is the ``dmr-operator`` command."""

import sys

from dmr_operator.cli import main

sys.exit(main())
