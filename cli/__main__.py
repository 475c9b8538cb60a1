import sys

from valuekit.cli.main import main

sys.exit(main())
