"""Allow ``python -m spotfi_bridge``."""

from spotfi_bridge.cli import main

raise SystemExit(main())
