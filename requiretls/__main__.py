import sys

from requiretls.cli import main

sys.exit(main())
