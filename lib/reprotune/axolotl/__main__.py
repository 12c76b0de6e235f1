"""python -m reprotune.axolotl [README.md]: print the key map, or rewrite it between its markers there."""

import sys
from pathlib import Path

from reprotune.axolotl.output import key_map_markdown, write_key_map

if len(sys.argv) > 1:
    write_key_map(Path(sys.argv[1]))
else:
    print(key_map_markdown())
