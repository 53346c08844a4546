"""``python -m darkroom_client``: the ``darkroom`` command without an installed entry point."""

from __future__ import annotations

import sys

from darkroom_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
