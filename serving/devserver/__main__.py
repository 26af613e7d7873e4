"""`python -m serving.devserver`: run the development stand-in (see server.py)."""
import sys

from .server import main

sys.exit(main())
