import sys

from ragllm.cli import main

sys.exit(main())
