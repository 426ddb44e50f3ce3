"""``python -m ipad`` runs the daemon, exactly as the ``ipad`` command does."""

import sys

from ._cli_daemon import main

sys.exit(main())
