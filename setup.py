"""Builds the C core (csrc/) into pycoll.core._core with cffi at install time, and
ships the emulator's delay line source (csrc/tools/delayline.c) inside the
package, where pycoll.emulator compiles it on first use."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# Package data that lives outside the package in the source tree: (source, package, name).
EXTRA_PACKAGE_DATA = [(os.path.join("csrc", "tools", "delayline.c"), "pycoll.emulator", "delayline.c")]


class build_py_with_tools(build_py):
    """build_py that also copies EXTRA_PACKAGE_DATA into the built package.

    An editable install needs no copy: pycoll.emulator finds the source in the
    checkout."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src, package, name in EXTRA_PACKAGE_DATA:
            path = os.path.join(HERE, src)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{src} is missing (an incomplete sdist? see MANIFEST.in)")
            dest_dir = os.path.join(self.build_lib, *package.split("."))
            os.makedirs(dest_dir, exist_ok=True)
            dest = os.path.join(dest_dir, name)
            shutil.copyfile(path, dest)

    def get_outputs(self, include_bytecode=1):
        outs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outs
        for _src, package, name in EXTRA_PACKAGE_DATA:
            outs.append(os.path.join(self.build_lib, *package.split("."), name))
        return outs


setup(cffi_modules=["pycoll/_build.py:ffibuilder"], cmdclass={"build_py": build_py_with_tools})
