"""``python -m fedlora.simulations.cli``: the ``fedlora`` command without the installed script."""

import sys

from fedlora.simulations.cli.main import main

sys.exit(main())
