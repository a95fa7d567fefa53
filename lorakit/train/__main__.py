"""`python -m lorakit.train train|eval ...` (and `torchrun ... -m lorakit.train train ...`)."""

import sys

from lorakit.cli.train import main

sys.exit(main())
