"""Where the tests' shared files are, wherever a test module lives under tests/."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
