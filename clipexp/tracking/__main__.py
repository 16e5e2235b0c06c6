"""``python -m clipexp.tracking replay <run dir> [tracking uri]``: send a run's held MLflow writes to its store."""

import sys
from pathlib import Path

from clipexp.tracking.tracker import replay_pending

if len(sys.argv) not in (3, 4) or sys.argv[1] != "replay":
    sys.exit("usage: python -m clipexp.tracking replay <run dir> [tracking uri]")
sent = replay_pending(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else None)
print(f"sent {sent} held writes to the run's MLflow store")
