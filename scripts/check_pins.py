"""What this Python has of the pinned requirements, when pip could not install them (scripts/setup_env.sh).

A machine without a reachable package index (the lent GPU machines cannot download) may still hold every
dependency, in versions of its own. This lists each pin this Python lacks or holds in another version, and exits 1
only when one is missing altogether: the versions that differ are said, and the set-up goes on with them.

Usage: python scripts/check_pins.py REQUIREMENTS_FILE
"""

import re
import sys
from importlib import metadata

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s#;]+)")


def pins(text: str) -> list[tuple[str, str]]:
    """(name, version) of every `name==version` line; comments, blank lines and other specifiers are left out."""
    return [(m.group(1), m.group(2)) for line in text.splitlines() if (m := _PIN.match(line.split("#", 1)[0]))]


def check(pinned: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(missing names, [(name, pinned, installed)] for the versions that differ)."""
    missing, differ = [], []
    for name, version in pinned:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if installed != version:
            differ.append((name, version, installed))
    return missing, differ


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        missing, differ = check(pins(f.read()))
    for name, version, installed in differ:
        print(f"fastlm: {name} {installed} here, {version} pinned: going on with {installed}", file=sys.stderr)
    if missing:
        print(f"fastlm: not installed and not installable now: {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
