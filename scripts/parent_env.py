"""Let the virtualenv VENV see the packages of the Python that runs this, where that Python is itself a virtualenv.

scripts/setup_env.sh makes `.venv` with `--system-site-packages` so that a CUDA build of torch the machine already
has is reused. That flag shows the *base* interpreter's packages only: where `python3` is itself a virtualenv (the
lent GPU machines' is, /opt/torch/.venv; so is a user's own environment), its torch and the rest stayed invisible,
and the set-up installed the pinned CPU build beside them (or, offline, could not). This writes a .pth file into
VENV's site-packages listing the running environment's site-packages: Python appends them to sys.path after VENV's
own packages and before the base interpreter's. Where the running Python is not a virtualenv it removes that file;
run by VENV's own python it changes nothing.

Usage: python scripts/parent_env.py VENV
"""

import site
import sys
import sysconfig
from pathlib import Path

PTH = "_fastlm_parent_env.pth"


def venv_site_packages(venv: Path) -> Path:
    """VENV's purelib directory, laid out as this interpreter lays out a virtualenv it creates."""
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    venv = Path(argv[0]).resolve()
    if Path(sys.prefix).resolve() == venv:  # run by VENV's own python (an activated .venv): left as it is
        return 0
    target = venv_site_packages(venv)
    pth = target / PTH
    if sys.prefix == sys.base_prefix:
        pth.unlink(missing_ok=True)
        return 0
    target.mkdir(parents=True, exist_ok=True)
    pth.write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    print(f"fastlm: {venv.name} also sees {sys.prefix}'s packages ({PTH})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
