"""Build the Cython core; all metadata lives in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "overlaycache._core",
        ["overlaycache/_core.pyx"],
        # Portable flags only: an installed wheel must run on any CPU of the same architecture.
        extra_compile_args=["-O3", "-fno-strict-aliasing"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
