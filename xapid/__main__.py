import sys

from xapid.cli.main import main

sys.exit(main())
