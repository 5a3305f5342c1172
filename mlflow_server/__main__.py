"""``python -m mlflow_server start|stop|status [--home DIR] [--port N]``; see server.py."""

import sys

from mlflow_server.server import main

sys.exit(main())
