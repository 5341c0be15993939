import sys

from megagpt.cli import main

sys.exit(main())
