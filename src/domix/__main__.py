"""`python -m domix`: the command line, as launchers run it (`torchrun -m domix ...`,
`accelerate launch -m domix ...`). Under a launcher the command's report (and `--json`
document) comes from rank 0 alone; the other ranks return the same result, so their stdout is
dropped (their stderr, errors included, is kept)."""
import os
import sys

from .cli import main
from .distributed import launch_rank

if launch_rank() > 0:
    sys.stdout = open(os.devnull, "w")
sys.exit(main())
