"""`python -m samkit ...` (and `torchrun ... -m samkit train ...`): the samkit command line."""

import sys

from samkit.cli import main

sys.exit(main())
