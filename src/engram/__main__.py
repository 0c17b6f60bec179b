"""`python -m engram` is the same as the `engram` command."""

import sys

from engram.cli import main

sys.exit(main())
