"""`python -m kubeforge.runtime.extend`: the ContextExtensionJob runtime (see run.py)."""

import sys

from .run import main

sys.exit(main(sys.argv[1:]))
