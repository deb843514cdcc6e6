"""A Python process that provably cannot import this project: what a user's machine with only the
published packages sees. Every test that claims "without this project" runs its script through `run_clean`.

The interpreter starts with `-I -S`: no `site` module, so no `.pth` file runs (the editable install of
this project is one: it installs an import hook that maps the repository's modules); no current
directory, PYTHONPATH or user site on `sys.path`. The venv's site-packages folders are then appended as
plain path entries, and so is every directory a `.pth` file there lists, unless it lies in this
repository (a dependency installed from a folder stays reachable; `import` lines, the editable finders,
are not run). Before and after the script, the process asserts that `importlib.util.find_spec` finds
none of the project's modules, after transformers has put its remote-code cache on the path too. A
non-editable install (a copy of the project in site-packages) would be found, and the check says so:
the README installs with `pip install -e`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> list[str]:
    """Every top-level module and package of the repository, as a user's script would import them."""
    files = [p.stem for p in ROOT.glob("*.py")]
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    return sorted(files + packages)


def site_dirs() -> list[str]:
    """The venv's site-packages folders and the directories their `.pth` files list outside this repository."""
    paths = sysconfig.get_paths()
    dirs = list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    for site in list(dirs):
        for pth in sorted(Path(site).glob("*.pth")):
            for line in pth.read_text().splitlines():
                if not line.strip() or line.startswith(("#", "import ", "import\t")):
                    continue
                entry = (Path(site) / line.strip()).resolve()
                if entry.is_dir() and not entry.is_relative_to(ROOT) and str(entry) not in dirs:
                    dirs.append(str(entry))
    return dirs


CHECK = """
import importlib.util as _util
_found = [_name for _name in {modules!r} if _util.find_spec(_name) is not None]
assert not _found, f"this project is importable here: {{_found}}"
"""


def clean_script(script: str, extra_path: list[str] = ()) -> str:
    """`script` with the path set-up before it and the check that the project is absent around it."""
    check = CHECK.format(modules=project_modules())
    setup = f"import sys\nsys.path.extend({site_dirs() + list(extra_path)!r})\n"
    return setup + check + script + "\n" + check


def run_clean(
    script: str, *args: str, cwd: Path, timeout: float = 300, extra_path: list[str] = ()
) -> subprocess.CompletedProcess:
    """Run `script` (with `args` as sys.argv[1:]) in a clean interpreter in `cwd`, offline, on one thread,
    with transformers' remote-code cache in `cwd/hf_modules`. `extra_path` is for the test of this helper."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(Path(cwd) / "hf_modules"))
    argv = [sys.executable, "-I", "-S", "-c", clean_script(script, extra_path), *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
