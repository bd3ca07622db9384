"""`python -m kvstore.agent`: the node agent daemon (what `kvstore agent` and agent="auto" run)."""
import sys

from .daemon import main

sys.exit(main())
