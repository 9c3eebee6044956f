"""`python -m dicomnet` is the `dicomnet` command."""

import sys

from dicomnet.cli import main

sys.exit(main())
