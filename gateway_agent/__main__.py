"""``python -m gateway_agent``: the same as the ``gateway-agent`` console script."""

import sys

from .cli import main

sys.exit(main())
