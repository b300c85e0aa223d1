"""One run of a search: the device and its facts, the matched target, the run key and the
resumable state under OUT, the budget clock, one interleaved confirmation and one budget rule."""
