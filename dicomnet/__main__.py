"""`python -m dicomnet` is the `dicomnet` command."""

import sys

from dicomnet.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    sys.exit(main())
