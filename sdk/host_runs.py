"""onnxruntime runs on the host, bounded and interruptible: `host_session(model)`.

`InferenceSession.run()` is one C call: a Ctrl-C waits for it to return and no timeout reaches
it (a model with a Loop of 10^15 trips never returns). Here each run goes on a worker thread
with its own RunOptions while the calling thread waits in short slices; the deadline or a
Ctrl-C sets `terminate`, which onnxruntime checks between nodes and Loop iterations, so the
run ends within moments and the caller gets a one-line error (or its KeyboardInterrupt).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from . import cancel
from .errors import EdgesmithError

DEFAULT_LIMIT_S = 600.0
_limit = [DEFAULT_LIMIT_S]


@contextmanager
def run_limit(seconds: float):
    """Each host-side run inside the block gets `seconds` (a command's --timeout)."""
    before, _limit[0] = _limit[0], float(seconds)
    try:
        yield
    finally:
        _limit[0] = before


class BoundedSession:
    """An onnxruntime InferenceSession whose `run` is bounded by the run limit and stopped by
    Ctrl-C; everything else is the session's own."""

    def __init__(self, session):
        self.session = session

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def run(self, output_names, feed: dict, run_options=None):
        import onnxruntime as ort

        options = run_options or ort.RunOptions()
        options.log_severity_level = 4        # our one line says it, not onnxruntime's log
        box: dict = {}
        done = threading.Event()   # not Thread.join: a join that Ctrl-C interrupted once may
                                   # say the thread ended while it still runs (CPython < 3.13)

        def work() -> None:
            try:
                box["out"] = self.session.run(output_names, feed, options)
            except BaseException as exc:      # noqa: BLE001 - handed to the caller's thread
                box["error"] = exc
            finally:
                done.set()

        deadline = time.monotonic() + _limit[0]
        threading.Thread(target=work, daemon=True, name="edgesmith-host-run").start()
        try:
            while not done.wait(0.05):
                if cancel.requested.is_set():        # Ctrl-C while on a pool's thread
                    options.terminate = True
                    done.wait(30)
                    raise EdgesmithError("interrupted (Ctrl-C)")
                if time.monotonic() > deadline:
                    options.terminate = True
                    done.wait(30)
                    raise EdgesmithError(
                        f"a run of the model on this host took longer than {_limit[0]:.0f}s "
                        "(a Loop without end?); check the model or raise --timeout")
        except KeyboardInterrupt:
            options.terminate = True   # onnxruntime ends the run at its next node or iteration
            done.wait(30)
            raise
        if "error" in box:
            raise box["error"]
        return box["out"]


def host_session(model, options=None, providers=("CPUExecutionProvider",)) -> BoundedSession:
    """`model`: serialized bytes or a path, as InferenceSession takes them."""
    import onnxruntime as ort

    return BoundedSession(ort.InferenceSession(model, options, providers=list(providers)))


def bound_quantizer_calibration() -> None:
    """onnxruntime's quantizer opens its calibration session itself and runs every batch as one
    unbounded C call, so Ctrl-C waited for the run (and a Loop without end never returned).
    Its calibrators keep that session as `infer_session`; wrapping it where it is made puts
    their runs under the same bound and Ctrl-C as ours. Done once per process, nothing else of
    the calibrator changes."""
    from onnxruntime.quantization.calibrate import CalibraterBase

    make = CalibraterBase.create_inference_session
    if getattr(make, "edgesmith_bounded", False):
        return

    def create_inference_session(self) -> None:
        make(self)
        if not isinstance(self.infer_session, BoundedSession):
            self.infer_session = BoundedSession(self.infer_session)

    create_inference_session.edgesmith_bounded = True
    CalibraterBase.create_inference_session = create_inference_session
