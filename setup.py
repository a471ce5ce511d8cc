"""Build hook for the optional compiled kernels (everything else is declared in pyproject.toml).

``saef.compress._native`` is plain C against the Python C API. If it cannot be built (no compiler), the install
still succeeds and saef runs its numpy kernels instead (``saef.compress.kernels.NATIVE`` is then ``None``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("saef.compress._native", ["src/saef/compress/_native.c"], optional=True, extra_compile_args=["-O3"])])
