"""`python -m mdmt_tf` is the `mdmt` command."""
import sys

from mdmt_tf.cli import main

sys.exit(main())
