"""``python -m properties`` is ``lora-conformance``."""

from properties.cli import main

raise SystemExit(main())
