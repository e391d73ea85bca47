"""`python -m orchestrator` runs the `orch` command."""

import sys

from .cli import main

sys.exit(main())
