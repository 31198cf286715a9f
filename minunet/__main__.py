"""`python -m minunet ...` runs the `minunet` command (see minunet.cli)."""
import sys

from minunet.cli import main

sys.exit(main())
