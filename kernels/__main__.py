"""`python -m kernels`: the kernel benchmark (same as `python -m kernels.bench`, `megagpt bench kernels`)."""

import sys

from kernels.bench import main

sys.exit(main())
