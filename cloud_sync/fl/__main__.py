import sys

from cloud_sync.fl.cli import main

sys.exit(main())
