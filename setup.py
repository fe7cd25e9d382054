"""The compiled frame path (framebroker/_fastpath.c), built by ``pip install .`` when it can be.

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler
or the Python headers (on Debian: ``apt install gcc python3-dev``) the build says so and goes on,
and framebroker runs its pure-Python frame path, with a warning at import (``framebroker/_fast.py``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "framebroker._fastpath",
            sources=["framebroker/_fastpath.c"],
            extra_compile_args=["-O2", "-std=gnu11"],
            optional=True,
        )
    ]
)
