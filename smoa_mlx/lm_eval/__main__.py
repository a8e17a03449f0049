from ..cli import run
from . import main

if __name__ == "__main__":
    run(main)
