import sys

from xapid.cli import main

sys.exit(main())
