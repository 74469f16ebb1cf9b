"""`python -m search.cli ...`: the hwcompress command."""
from search.cli import run

run()
