"""Write the README's table of commands from the CLI's parser (sparsamba.cli.command_table).

python scripts/readme_commands.py          # rewrite the table in README.md
python scripts/readme_commands.py --check  # exit 1 when the README's table is stale
"""

import re
import sys
from pathlib import Path

from sparsamba.cli import command_table

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE = re.compile(r"\| command \| what it does \|\n(?:\|.*\|\n)+")


def main() -> int:
    text = README.read_text()
    if not TABLE.search(text):
        print("README.md has no table of commands (| command | what it does |)", file=sys.stderr)
        return 1
    new = TABLE.sub(lambda _: command_table(), text, count=1)
    if "--check" in sys.argv:
        if new != text:
            print(
                "README.md's table of commands is stale: run python scripts/readme_commands.py",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
