"""Package discovery that pyproject.toml cannot express: the `sdk/` folder installs as the
`edgesmith` package, with every subpackage found automatically (a hand-written list once
shipped a wheel without `sdk/passes`)."""
from setuptools import find_packages, setup

setup(
    packages=(["edgesmith"] + [f"edgesmith.{p}" for p in find_packages("sdk")]
              + find_packages(include=["device_runtime", "device_runtime.*"])
              + ["edgesmith_targets", "edgesmith_kernels"]),
    package_dir={"edgesmith": "sdk", "edgesmith_targets": "targets", "edgesmith_kernels": "kernels"},
    package_data={"edgesmith_targets": ["*.toml"], "edgesmith_kernels": ["*.c", "*.h"]},
)
