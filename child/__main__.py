"""Entry point of a child process: ``python -m child --fd N --parent PID``."""

from .runtime import main

if __name__ == "__main__":
    main()
