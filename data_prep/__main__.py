"""`python -m data_prep ...`: the same as `megagpt prep ...`."""

import sys

from data_prep.cli import main

sys.exit(main())
