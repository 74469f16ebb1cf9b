"""`python -m search.cli ...`: the hwcompress command."""
import sys

from search.cli import main

sys.exit(main())
