import sys

from cbd_cli import main

sys.exit(main())
