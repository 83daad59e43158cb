"""`python -m bench`: see bench/driver.py."""

from .driver import main

raise SystemExit(main())
