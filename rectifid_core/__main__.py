"""`python -m rectifid_core ...`: the RectifID command line (see cli.py)."""
from .cli import main

raise SystemExit(main())
