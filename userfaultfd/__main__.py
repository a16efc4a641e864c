"""``python -m userfaultfd`` is the ``uffd`` command."""

import sys

from .cli import main

sys.exit(main())
