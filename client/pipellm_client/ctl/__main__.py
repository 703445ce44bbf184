"""`python -m pipellm_client.ctl` = `pipellmctl` (for hosts where the console script is not on PATH)."""

import sys

from .main import main

sys.exit(main())
