"""``python -m simulations.cli``: the ``fedlora`` command without the installed script."""

import sys

from simulations.cli.main import main

sys.exit(main())
