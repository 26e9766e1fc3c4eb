import sys
from pathlib import Path

# The helpers in tests/fakes.py, importable from every test file and from spawned workers.
sys.path.insert(0, str(Path(__file__).parent))
