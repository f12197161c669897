"""``python -m gateway``: the kzg-gateway command line."""

import sys

from gateway.cli.main import main

sys.exit(main())
