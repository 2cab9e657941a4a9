"""`python -m pocketfleet ...` runs the `pocketfleet` command."""

import sys

from pocketfleet.cli import main

sys.exit(main())
