"""`python -m trainer.cli`: the same as the `mrcnn` console script."""

import sys

from trainer.cli.main import main

sys.exit(main())
