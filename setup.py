"""Build: the pure-Python package always; the compiled extension when possible (see csrc/)."""
from setuptools import setup

setup()
