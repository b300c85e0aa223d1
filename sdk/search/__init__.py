"""The searches, side by side over one run object and one cache: int8 recipes (`int8`),
runtime-config and kernel tuning (`tune`), NetAdapt width search (`nas`) and the choice among
measured candidates (`select`). A search never imports another search; what they share lives
below them (`cache`, `edgesmith.run`, `edgesmith.measure`)."""
