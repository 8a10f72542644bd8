import sys

from dmi.cli import main

sys.exit(main())
