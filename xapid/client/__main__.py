"""``python -m xapid.client VERB …``."""

import sys

from xapid.client import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], sys.stdin, sys.stdout, sys.stderr))
