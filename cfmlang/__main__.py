"""`python -m cfmlang` is `cfmc`."""
import sys

from cfmlang.cli import main

sys.exit(main())
