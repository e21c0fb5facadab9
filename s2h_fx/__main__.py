"""``python -m s2h_fx``: the ``s2h-fx`` command line."""

import sys

from s2h_fx.cli import main

sys.exit(main())
