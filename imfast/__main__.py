from imfast.cli import main

raise SystemExit(main())
