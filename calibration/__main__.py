"""``python -m hf_turbo.calibration``: the same as ``hf-turbo calibrate``."""

import sys

from .cli import main

sys.exit(main())
