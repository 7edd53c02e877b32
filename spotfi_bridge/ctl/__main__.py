"""``python -m spotfi_bridge.ctl``: the same as the ``spotfi-bridge-ctl`` console script."""

from spotfi_bridge.ctl import main

raise SystemExit(main())
