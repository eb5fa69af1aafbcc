"""Only the C part of the llama.cpp scheduler (engines/llamacpp/steps.c); everything else is in pyproject.toml.

It is a plain shared library that engines/llamacpp/steps.py loads with ctypes: no Python C API in it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engines.llamacpp._steps",
            sources=["engines/llamacpp/steps.c"],
            extra_compile_args=["-O3", "-fopenmp-simd", "-Wall"],
        )
    ]
)
