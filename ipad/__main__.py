"""``python -m ipad`` runs the daemon, exactly as the ``ipad`` command does."""

import sys

from ipad.cli.daemon import main

sys.exit(main())
