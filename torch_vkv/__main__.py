import sys

from torch_vkv.cli import main

sys.exit(main())
