"""``python -m pipeline.store list|show|rm|gc`` (pipeline/store/manage.py)."""

import sys

from pipeline.errors import UserError
from pipeline.store.manage import main

try:
    sys.exit(main())
except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
