"""Build script. Pure-Python for now; the C++/CUDA extension (csrc/) is added here."""

from setuptools import setup

setup()
