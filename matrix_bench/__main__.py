import sys

from matrix_bench.cli import main

sys.exit(main())
