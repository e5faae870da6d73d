from probekit.cli import main

raise SystemExit(main())
