"""Build step on top of setup.cfg: the wheel carries the bundled recipes and ensemble specs.

`models/*.yaml` and `ensembles/*.yaml` stay at the top level of the checkout (the copies people edit and
the paths the README uses); building a wheel copies them into the package as `submit/_bundled/models` and
`submit/_bundled/ensembles` (see submit/bundled.py), so a plain `pip install .` runs `reident-submit demo`
and finds `--ensemble NAME`. One source, no second copy in git to drift, no symlinks (fragile in wheels).
An editable install needs no copy: submit/bundled.py finds the checkout's folders.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLED = ("models", "ensembles")


class BuildPyWithBundled(build_py):
    """build_py, then copy models/*.yaml and ensembles/*.yaml into the built package's _bundled/ folder."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder in BUNDLED:
            sources = sorted((HERE / folder).glob("*.yaml"))
            if not sources:
                raise SystemExit(f"{HERE / folder}: no *.yaml to bundle (an sdist without MANIFEST.in's folders?)")
            target = Path(self.build_lib) / "submit" / "_bundled" / folder
            self.mkpath(str(target))
            for source in sources:
                self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildPyWithBundled})
