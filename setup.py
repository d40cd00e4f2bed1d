"""setuptools needs this file only for cffi's `cffi_modules` hook (metadata: pyproject.toml)."""

from setuptools import setup

setup(cffi_modules=["native/build_sys.py:ffibuilder"])
