"""Print the first ```bash block under a README heading (with --first: its first command alone),
so CI runs what the README says rather than a copy of it."""

import re
import sys
from pathlib import Path


args = [arg for arg in sys.argv[1:] if arg != "--first"]
heading = args[0]
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
section = text.split(f"\n## {heading}\n", 1)
if len(section) != 2:
    sys.exit(f"README.md has no '## {heading}' section")
block = re.search(r"```bash\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
if block is None:
    sys.exit(f"README.md's '{heading}' section has no bash block")
if "--first" not in sys.argv:
    print(block.group(1), end="")
    sys.exit(0)
commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
commands = [command for command in commands if command]
if not commands:
    sys.exit(f"README.md's '{heading}' block has no command")
print(commands[0])
