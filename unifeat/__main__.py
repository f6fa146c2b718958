"""``python -m unifeat``: the same command line as ``unifeat``."""

import sys

from unifeat._cli import main

if __name__ == "__main__":
    sys.exit(main())
