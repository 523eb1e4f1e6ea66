"""``python -m vitrim``: the same as the ``vitrim`` command."""
import sys

from vitrim.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
