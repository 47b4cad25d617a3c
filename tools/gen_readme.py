"""Refresh the demo output shown in README.md by running the demo for real.

    .venv/bin/python tools/gen_readme.py

Replaces the fenced block between the ``demo-output`` markers with what
``tools/demo.py`` prints now, so the README cannot drift from the code.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py")], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout.strip()
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"<!-- demo-output:start -->\n```\n{out}\n```\n<!-- demo-output:end -->"
    new, n = re.subn(r"<!-- demo-output:start -->.*?<!-- demo-output:end -->", lambda m: block, text, flags=re.S)
    if n != 1:
        sys.exit("README.md has no demo-output markers")
    readme.write_text(new)
    print(out)


if __name__ == "__main__":
    main()
