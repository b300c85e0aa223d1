"""`optimize`, the main job: its config, its candidate families (stages) and the pipeline that
runs them over one run object."""
