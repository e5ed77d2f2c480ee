"""The torchrun worker entry: ``python -m detprune.worker '<argv as JSON>'`` runs
``detprune <argv>`` in one training process (see :func:`detprune.train.distributed.launch`,
which the CLI calls with this module). The arguments come as one JSON word because
torchrun's own parser would take ``--nproc`` and ``--log``."""

from __future__ import annotations

import json
import sys

from detprune.cli import main

if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
