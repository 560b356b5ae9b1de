"""``python -m multirun``: the ``multirun`` command, for when its script is not on PATH."""

import sys

from multirun.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
