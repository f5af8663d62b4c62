import sys

from swarmnet.cli import main

sys.exit(main())
