"""A verified, loaded bundle: what edge applications embed (`device_runtime.load(dir)`)."""
from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from . import backends
from .bundle import Manifest, verify
from .errors import RuntimeFailure


def dims_match(declared: list, shape) -> bool:
    return len(declared) == len(shape) and all(d is None or d == s for d, s in zip(declared, shape))


class Session:
    """Runs one bundle's model; inputs are checked against the manifest before the backend."""

    def __init__(self, root: Path, manifest: Manifest, bundle_id: str, backend, load_ms: float):
        self.root, self.manifest, self.bundle_id = root, manifest, bundle_id
        self.backend, self.load_ms = backend, load_ms
        self.inputs = {spec["name"]: spec for spec in manifest.inputs}
        self.output_names = list(backend.output_names)
        self.versions: dict = {}
        self._expect: dict = {}   # name -> (np.dtype, dims): checked on every run, so precomputed

    def _expected(self, name: str):
        if name not in self._expect:
            import numpy as np
            spec = self.inputs[name]
            self._expect[name] = (np.dtype(spec["dtype"]), spec["dims"])
        return self._expect[name]

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike, **config_overrides) -> "Session":
        """Verify, then load; `threads=N` maps to the backend's own thread setting."""
        root = Path(bundle_dir)
        manifest, bundle_id = verify(root)
        backend_cls = backends.get(manifest.backend)
        threads = config_overrides.pop("threads", None)
        config = {**manifest.config, **config_overrides}
        if threads is not None:  # one knob name for every backend
            cores = os.cpu_count() or 1
            if not 0 <= int(threads) <= cores:
                raise RuntimeFailure("load", f"threads={threads}: this device has {cores} "
                                     f"cores; use 1..{cores} (0 = the runtime's default)")
            config[backend_cls.threads_key] = int(threads)
        if libs := config.get("custom_op_libraries"):   # native code: verified files only
            if any(rel not in manifest.files for rel in libs):
                raise RuntimeFailure("load", "a kernel library is not a verified file of the "
                                     "bundle; rebuild the bundle with the edgesmith sdk")
            config["custom_op_libraries"] = [str(root.resolve() / rel) for rel in libs]
        versions = importlib.import_module(backend_cls.__module__).versions()  # imports runtime
        start = time.perf_counter()
        backend = backend_cls(str(root / manifest.model), config)
        session = cls(root, manifest, bundle_id, backend, (time.perf_counter() - start) * 1e3)
        session.versions = versions
        return session

    @property
    def config(self) -> dict:
        return self.backend.config

    def check_feed(self, feed: dict) -> dict:
        """Names, dtypes and shapes against the manifest; cheap enough for every call."""
        import numpy as np

        if feed.keys() != self.inputs.keys():
            missing = sorted(set(self.inputs) - set(feed))
            unknown = sorted(set(feed) - set(self.inputs))
            raise RuntimeFailure("run", f"inputs must be named {sorted(self.inputs)}; missing "
                                 f"{missing}, unknown {unknown}")
        checked = {}
        for name, array in feed.items():
            dtype, dims = self._expected(name)
            if type(array) is not np.ndarray:
                array = np.asarray(array)
            if array.dtype != dtype:
                raise RuntimeFailure("run", f"input {name!r} has dtype {array.dtype}, the model "
                                     f"takes {dtype}; convert it with .astype()")
            if not dims_match(dims, array.shape):
                want = "x".join("?" if d is None else str(d) for d in dims)
                raise RuntimeFailure("run", f"input {name!r} has shape {list(array.shape)}, the "
                                     f"model takes {want}")
            checked[name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        return checked

    def run(self, feed: dict) -> dict:
        """Run once on `{input name: array}`; returns `{output name: array}`."""
        outputs = self.backend.run(self.check_feed(feed))
        return dict(zip(self.output_names, outputs))

    def example_feed(self, seed: int = 0) -> dict:
        """A feed of the manifest's concrete shapes: the first eval sample, else random data."""
        import numpy as np

        if self.manifest.eval:
            from .evaluate import load_eval

            data = load_eval(self.root / self.manifest.eval, self.inputs,
                             state=self.manifest.state)
            batch = 1 if data.state else [s["shape"][0] if s["shape"] else 1
                                          for s in self.inputs.values()][0]
            if data.n >= batch:
                return data.feed(0, batch, self.inputs)
        rng = np.random.default_rng(seed)
        feed = {}
        for name, spec in self.inputs.items():
            dtype = np.dtype(spec["dtype"])
            if dtype.kind == "f":
                feed[name] = rng.standard_normal(spec["shape"]).astype(dtype)
            elif dtype.kind == "b":
                feed[name] = rng.integers(0, 2, spec["shape"]).astype(dtype)
            else:
                feed[name] = rng.integers(0, 10, spec["shape"]).astype(dtype)
        return feed
