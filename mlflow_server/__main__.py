"""``python -m mlflow_server start|stop|status [--home DIR] [--port N] [--auth] [--backend-store-uri URI]``;
see server.py and README.md."""

import sys

from mlflow_server.server import main

sys.exit(main())
