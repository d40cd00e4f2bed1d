"""setuptools needs this file only for cffi's `cffi_modules` hook; all metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_sys.py:ffibuilder"])
