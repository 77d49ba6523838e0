"""``python -m ggufvideo ...``: the same as the ``ggufvideo`` command."""

import sys

from .cli import main

sys.exit(main())
