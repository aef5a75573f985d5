"""``python -m caft_tl.cli ...`` (what ``torchrun`` runs): the ``caft-tl`` command."""

import sys

from caft_tl.cli.app import main

sys.exit(main())
