"""The C part of kipfix; everything else is in pyproject.toml.

The data-record encoder (agent/export/ipfix/_flowpack.c, see flowpack.py) needs gcc
and python3-dev at install time (scripts/install.sh installs both).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "kipfix.agent.export.ipfix._flowpack", ["agent/export/ipfix/_flowpack.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
)])
