"""Print the first ```bash block under a README heading, so CI runs what the README says."""

import re
import sys
from pathlib import Path

heading = sys.argv[1]
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
section = text.split(f"\n## {heading}\n", 1)
if len(section) != 2:
    sys.exit(f"README.md has no '## {heading}' section")
block = re.search(r"```bash\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
if block is None:
    sys.exit(f"README.md's '{heading}' section has no bash block")
print(block.group(1), end="")
