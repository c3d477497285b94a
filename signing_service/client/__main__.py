"""`python -m signing_service.client` runs the `modelsign` command line."""

from signing_service.client.cli import main

raise SystemExit(main())
