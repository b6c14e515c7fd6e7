"""python -m kvtier serve ... | store ... : the `kvtier` command."""
import sys

from kvtier.engine.entrypoints.cli import main

sys.exit(main())
