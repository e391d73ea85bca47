"""`python -m orchestrator` runs the `orch` command."""

import sys

from .cli.main import main

sys.exit(main())
