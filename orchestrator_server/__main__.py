import sys

from orchestrator_server.cli import main

sys.exit(main())
