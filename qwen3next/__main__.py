"""`python -m qwen3next` runs the CLI."""

import sys

from qwen3next.cli.main import main

sys.exit(main())
