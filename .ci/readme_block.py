"""Print a ```bash block under a README heading (with --first: its first command alone), so CI runs what the
README says rather than a copy of it.

    python3 .ci/readme_block.py HEADING [--block N] [--first]

HEADING is a "## HEADING" line's text; --block N picks the Nth bash block of that section (default 1).
"""

import re
import sys
from pathlib import Path


def fail(message: str) -> None:
    sys.exit(f"readme_block: {message}")


args = sys.argv[1:]
first = "--first" in args
args = [arg for arg in args if arg != "--first"]
number = 1
if "--block" in args:
    at = args.index("--block")
    try:
        number = int(args[at + 1])
    except (IndexError, ValueError):
        fail("--block takes a number (1 for the first bash block)")
    del args[at:at + 2]
if len(args) != 1 or number < 1:
    fail("usage: readme_block.py HEADING [--block N] [--first]")
heading = args[0]
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
section = text.split(f"\n## {heading}\n", 1)
if len(section) != 2:
    fail(f"README.md has no '## {heading}' section")
blocks = re.findall(r"^```bash\n(.*?)^```", section[1].split("\n## ", 1)[0], re.S | re.M)
if len(blocks) < number:
    fail(f"README.md's '{heading}' section has {len(blocks)} bash block(s), not {number}")
block = blocks[number - 1]
if not first:
    print(block, end="")
    sys.exit(0)
commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
commands = [command for command in commands if command]
if not commands:
    fail(f"README.md's '{heading}' block has no command")
print(commands[0])
