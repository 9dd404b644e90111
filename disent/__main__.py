"""`python -m disent`: the `disent` command."""
import sys

from disent.cli import main

sys.exit(main())
