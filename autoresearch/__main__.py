"""python -m autoresearch: the same as the `autoresearch` console command."""
import sys

from autoresearch.cli import main

sys.exit(main())
