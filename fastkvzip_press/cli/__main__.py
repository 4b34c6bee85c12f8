"""``python -m fastkvzip_press.cli`` (what torchrun launches)."""

import sys

from fastkvzip_press.cli import main

sys.exit(main())
