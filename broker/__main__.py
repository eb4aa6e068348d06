"""`python -m broker ...`: see broker/cli."""

from broker.cli import main

raise SystemExit(main())
