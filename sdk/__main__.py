"""`python -m edgesmith`: the same CLI as the `edgesmith` command."""
from .cli import main

main(prog_name="edgesmith")
