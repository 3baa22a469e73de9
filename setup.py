"""Builds the C core (csrc/) into pycoll._core with cffi at install time."""
from setuptools import setup

setup(cffi_modules=["pycoll/_build.py:ffibuilder"])
