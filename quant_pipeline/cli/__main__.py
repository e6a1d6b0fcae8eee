"""`python -m quant_pipeline.cli`: the same entry point as the `quant-pipeline` script."""

import sys

from quant_pipeline.cli import main

sys.exit(main())
